"""The configuration files of GLM-Image's official folder (zai-org/GLM-Image, diffusers layout).

:data:`FULL_SIZE` is the official network geometry (glm-image-architecture.md §1-4: ~17B parameters);
:func:`official_configs` writes every config file of the folder for it, or for a scaled-down geometry
(the test checkpoints, ``tiny_checkpoint.SIZES``). The memory plan and the component registry read the
official configs from here; the test-checkpoint writer reads them too, never the other way round.
"""

from __future__ import annotations

from typing import Dict

# Real GLM-Image VAE latent statistics (vae/config.json of zai-org/GLM-Image, via FastVideo).
# The test checkpoints use them too, so the per-channel normalisation is never an identity.
GLM_LATENTS_MEAN = [-0.2080078125, 1.875, -0.470703125, -1.265625, -1.421875, 0.77734375, -0.3671875,
                    -0.9453125, 0.318359375, 0.7734375, -0.1884765625, -0.022216796875, -0.220703125,
                    -1.59375, -0.81640625, -0.255859375]
GLM_LATENTS_STD = [3.0625, 2.203125, 2.265625, 4.84375, 2.5, 3.9375, 2.203125, 3.03125, 2.1875, 2.046875,
                   2.71875, 2.390625, 2.390625, 2.453125, 2.25, 2.15625]

TEXT_VOCAB_SIZE = 168064       # real GLM-Image AR input vocabulary (keeps the real special-token ids)
VISION_VOCAB_SIZE = 16512      # real lm_head width
CODEBOOK_SIZE = 16384          # real VQ codebook / DiT prior embedding rows

SPECIAL_TOKENS = {             # real ids (reference-oracle.md §3.1)
    "<|dit_token_16384|>": 16384,
    "<|dit_token_16385|>": 16385,
    "<|endoftext|>": 167841,
    "[gMASK]": 167843,
    "<sop>": 167845,
    "<eop>": 167846,
    "<|image|>": 167855,
}

# The official geometry: (AR text, AR vision, VQ, DiT, T5, VAE) settings.
FULL_SIZE: Dict[str, dict] = dict(
    text=dict(hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
              num_key_value_heads=2, mrope_section=[8, 12, 12]),
    vision=dict(depth=40, hidden_size=1536, num_heads=16, intermediate_size=6144, image_size=2048),
    vq=dict(embed_dim=2048, num_embeddings=CODEBOOK_SIZE),
    dit=dict(num_layers=30, attention_head_dim=128, num_attention_heads=32, time_embed_dim=512, condition_dim=256),
    t5=dict(d_model=1472, d_kv=64, d_ff=3584, num_layers=12, num_heads=6),
    vae=dict(block_out_channels=[128, 512, 1024, 1024], layers_per_block=3, norm_num_groups=32),
)


def official_configs(geometry: dict) -> Dict[str, dict]:
    """Every config file of a GLM-Image folder (relative path -> dict) for a network geometry:
    :data:`FULL_SIZE` gives the official ones; the test checkpoints scale it down
    (``tiny_checkpoint.SIZES``). Everything but the geometry is the official value."""
    s = geometry
    t, v, q, d, e, a = s["text"], s["vision"], s["vq"], s["dit"], s["t5"], s["vae"]
    ar = {
        "architectures": ["GlmImageForConditionalGeneration"],
        "dtype": "float32",
        "image_end_token_id": 16385,
        "image_start_token_id": 16384,
        "image_token_id": SPECIAL_TOKENS["<|image|>"],
        "model_type": "glm_image",
        "text_config": {
            "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 16385, "hidden_act": "silu",
            "hidden_size": t["hidden_size"], "initializer_range": 0.02,
            "intermediate_size": t["intermediate_size"], "max_position_embeddings": 8192,
            "model_type": "glm_image_text", "num_attention_heads": t["num_attention_heads"],
            "num_hidden_layers": t["num_hidden_layers"], "num_key_value_heads": t["num_key_value_heads"],
            "pad_token_id": SPECIAL_TOKENS["<|endoftext|>"], "rms_norm_eps": 1e-05,
            "rope_parameters": {"mrope_section": t["mrope_section"], "partial_rotary_factor": 0.5,
                                "rope_theta": 10000.0, "rope_type": "default"},
            "use_cache": True, "vision_vocab_size": VISION_VOCAB_SIZE, "vocab_size": TEXT_VOCAB_SIZE,
        },
        "tie_word_embeddings": False,
        "transformers_version": "5.17.0",
        "vision_config": {
            "attention_bias": True, "attention_dropout": 0.0, "depth": v["depth"], "hidden_act": "gelu",
            "hidden_size": v["hidden_size"], "image_size": v["image_size"], "in_channels": 3,
            "initializer_range": 0.02, "intermediate_size": v["intermediate_size"], "layer_norm_eps": 1e-06,
            "model_type": "glm_image_vision", "num_heads": v["num_heads"], "patch_size": 16,
            "spatial_merge_size": 1,
        },
        "vq_config": {
            "embed_dim": q["embed_dim"], "in_channels": 3, "initializer_range": 0.02,
            "latent_channels": v["hidden_size"], "model_type": "glm_image_vqmodel",
            "num_embeddings": q["num_embeddings"],
        },
    }
    generation = {"bos_token_id": 16384, "do_sample": True, "eos_token_id": 16385,
                  "pad_token_id": SPECIAL_TOKENS["<|endoftext|>"], "temperature": 0.9,
                  "top_k": VISION_VOCAB_SIZE, "top_p": 0.75, "transformers_version": "5.17.0"}
    dit = {"_class_name": "GlmImageTransformer2DModel", "_diffusers_version": "0.42.1",
           "attention_head_dim": d["attention_head_dim"], "condition_dim": d["condition_dim"],
           "in_channels": 16, "num_attention_heads": d["num_attention_heads"], "num_layers": d["num_layers"],
           "out_channels": 16, "patch_size": 2, "prior_vq_quantizer_codebook_size": q["num_embeddings"],
           "text_embed_dim": e["d_model"], "time_embed_dim": d["time_embed_dim"]}
    t5 = {"architectures": ["T5EncoderModel"], "classifier_dropout": 0.0, "d_ff": e["d_ff"], "d_kv": e["d_kv"],
          "d_model": e["d_model"], "dense_act_fn": "gelu_new", "dropout_rate": 0.0, "dtype": "float32",
          "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0, "is_decoder": False,
          "is_encoder_decoder": False, "is_gated_act": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
          "num_decoder_layers": e["num_layers"], "num_heads": e["num_heads"], "num_layers": e["num_layers"],
          "pad_token_id": 0, "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
          "scale_decoder_outputs": True, "tie_word_embeddings": True, "transformers_version": "5.17.0",
          "use_cache": False, "vocab_size": 384}
    vae = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "act_fn": "silu",
           "block_out_channels": a["block_out_channels"], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "force_upcast": True, "in_channels": 3, "latent_channels": 16, "latents_mean": GLM_LATENTS_MEAN,
           "latents_std": GLM_LATENTS_STD, "layers_per_block": a["layers_per_block"],
           "mid_block_add_attention": False, "norm_num_groups": a["norm_num_groups"], "out_channels": 3,
           "sample_size": 1024, "scaling_factor": 0.18215, "shift_factor": None,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "use_post_quant_conv": False, "use_quant_conv": False}
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.42.1",
                 "base_image_seq_len": 256, "base_shift": 0.25, "invert_sigmas": False, "max_image_seq_len": 4096,
                 "max_shift": 0.75, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": None,
                 "stochastic_sampling": False, "time_shift_type": "linear", "use_beta_sigmas": False,
                 "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False}
    processor = {"image_processor": {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "GlmImageImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "merge_size": 1, "patch_size": 16, "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 2048 * 2048, "shortest_edge": 32 * 32},
        "temporal_patch_size": 1}, "processor_class": "GlmImageProcessor"}
    model_index = {"_class_name": "GlmImagePipeline", "_diffusers_version": "0.42.1",
                   "processor": ["glm_image", "GlmImageProcessor"],
                   "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "T5EncoderModel"],
                   "tokenizer": ["transformers", "ByT5Tokenizer"],
                   "transformer": ["diffusers", "GlmImageTransformer2DModel"],
                   "vae": ["diffusers", "AutoencoderKL"],
                   "vision_language_encoder": ["glm_image", "GlmImageForConditionalGeneration"]}
    return {
        "model_index.json": model_index,
        "vision_language_encoder/config.json": ar,
        "vision_language_encoder/generation_config.json": generation,
        "transformer/config.json": dit,
        "text_encoder/config.json": t5,
        "vae/config.json": vae,
        "scheduler/scheduler_config.json": scheduler,
        "processor/processor_config.json": processor,
    }
