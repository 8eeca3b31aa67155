"""GLM-Image's VAE as a stock ComfyUI VAE (placeholder until the VAE stage lands)."""


def load_glm_vae(vae_dir: str, weight_dtype: str = "default"):
    raise NotImplementedError("GLM-Image VAE loading is not implemented yet")
