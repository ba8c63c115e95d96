"""The benchmark against Hugging Face diffusers: `python -m ddpmlab.bench` (run.py); the peer's side in peer.py."""
