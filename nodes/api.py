"""The ComfyUI node API the pack is written against.

comfy_api.v0_0_2, not comfy_api.latest: `latest` is whatever the running ComfyUI ships and moves with
every release, while a versioned module is the API a pack was written for (Comfy's own guidance), and
0.0.2 is the newest one that both supported hosts, ComfyUI 0.3.75 and 0.33, provide."""
from comfy_api.v0_0_2 import ComfyExtension, io, ui  # noqa: F401
