"""unmask serve: an OpenAI-compatible server that batches denoising across requests
(needs the serve extra: pip install 'unmask[serve]')."""
