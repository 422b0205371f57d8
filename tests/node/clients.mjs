// Node 20 clients that tests/test_clients.py drives through cassette-proxy.
// Usage: node clients.mjs <client> <base URL> <prompt>; prints one JSON object.
//   fetch-proxy   undici's fetch through HTTP(S)_PROXY (EnvHttpProxyAgent), a streamed chat
//   openai        openai-node as is: base URL at the proxy (reverse mode)
//   openai-proxy  openai-node through HTTP(S)_PROXY (fetchOptions.dispatcher)
// Node's own fetch() ignores HTTP(S)_PROXY, hence undici's agent. HTTPS upstreams are
// trusted through NODE_EXTRA_CA_CERTS (mitmproxy's CA), as cassette-proxy run prints.
import OpenAI from "openai";
import { EnvHttpProxyAgent, fetch as undiciFetch } from "undici";

const [client, baseURL, prompt] = process.argv.slice(2);
const messages = [{ role: "user", content: prompt }];

async function fetchThroughProxy() {
  const res = await undiciFetch(`${baseURL}/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer sk-node-test" },
    body: JSON.stringify({ model: "fake-model", stream: true, messages }),
    dispatcher: new EnvHttpProxyAgent(),
  });
  let content = "";
  for (const line of (await res.text()).split("\n")) {
    if (line.startsWith("data: ") && line !== "data: [DONE]") {
      content += JSON.parse(line.slice(6)).choices[0]?.delta?.content ?? "";
    }
  }
  return { status: res.status, content, file: res.headers.get("x-cassette-file") };
}

async function withOpenAI(options) {
  const openai = new OpenAI({ baseURL, apiKey: "sk-node-test", maxRetries: 0, ...options });
  const stream = await openai.chat.completions.create({ model: "fake-model", messages, stream: true });
  let content = "";
  for await (const chunk of stream) content += chunk.choices[0]?.delta?.content ?? "";
  const tools = [{ type: "function", function: { name: "get_weather", parameters: { type: "object" } } }];
  const call = await openai.chat.completions.create({ model: "fake-model", messages, tools });
  const emb = await openai.embeddings.create({ model: "fake-embedding", input: prompt });
  const models = [];
  for await (const model of openai.models.list()) models.push(model.id);
  return {
    content,
    tool_call: call.choices[0].message.tool_calls[0].function,
    embedding: emb.data[0].embedding,
    models,
  };
}

const run = {
  "fetch-proxy": fetchThroughProxy,
  openai: () => withOpenAI({}),
  "openai-proxy": () => withOpenAI({ fetchOptions: { dispatcher: new EnvHttpProxyAgent() } }),
}[client];
if (!run) {
  console.error(`unknown client ${client}`);
  process.exit(2);
}
console.log(JSON.stringify(await run()));
