"""Load cassette-proxy into mitmproxy: ``mitmdump -s addons/recorder.py``.

The logic lives in the ``cassette_proxy`` package beside this file.
"""

from cassette_proxy.addon import CassetteRecorder

addons = [CassetteRecorder()]
