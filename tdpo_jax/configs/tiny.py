"""`sd15.py` with the tiny shapes of the official code's CPU timing run: CI and smoke tests.

64x64 images, 4x8x8 latents, UNet blocks (32, 64), CLIP text hidden 32, a 32-d CLIP image
encoder for the critic; 8 samples, 10 DDIM steps, micro-batch 2, 10 + 10 optimizer steps per epoch.
The model is built from random weights on first use ("tiny:<seed>"), so it runs offline.
"""
import ml_collections

from tdpo_jax.configs import sd15


def get_config(arg=None):
  c = sd15.get_config(arg)
  c.seed = 0
  c.num_epochs = 4
  c.pretrained.model = "tiny:0"
  c.pretrained.image_encoder = ""  # "" = the pipeline directory's image_encoder/ subfolder
  c.pretrained.tiny = tiny_model_spec()
  c.reward = "jpeg_compressibility"
  c.sample.num_steps = 10
  c.sample.height = 64
  c.sample.width = 64
  c.sample.batch_size = 4
  c.sample.num_batches_per_epoch = 2
  c.train.batch_size = 2
  c.train.gradient_accumulation_steps = 4
  c.critic.embed_chunk_size = 0  # all 80 states in one call
  c.critic.embed_branches = 4  # 4 concurrent chains on a CPU (benchmarks/branches.py: 0.68x)
  c.train.remat = "none"  # or "unet" / "blocks" (configs/sd15.py)
  c.reset.period = 2
  c.log.num_grid_images = 8
  # Two cheap eval rewards, diversity with the tiny 32-d image encoder; 2 prompts x 2 samples
  # fit one rollout of sample.batch_size 4 (the batch split over the mesh as training's).
  c.eval.every = 2
  c.eval.rewards = ("jpeg_compressibility", "jpeg_incompressibility")
  c.eval.prompts = "animal_activities"
  c.eval.num_prompts = 2
  c.eval.samples_per_prompt = 2
  c.eval.diversity = True
  return c


def tiny_model_spec():
  """Architecture of the tiny pipeline (numbers of the official timing run's tiny_config.json).

  Each entry is the diffusers / transformers config of one component; the builder in
  `tdpo_jax.models.tiny` initialises it from random weights, deterministically by seed.
  """
  spec = ml_collections.ConfigDict()
  spec.vae = dict(
      in_channels=3, out_channels=3, latent_channels=4,
      block_out_channels=(32, 32, 64, 64),
      down_block_types=("DownEncoderBlock2D",) * 4,
      up_block_types=("UpDecoderBlock2D",) * 4,
      layers_per_block=1, norm_num_groups=32, sample_size=64, scaling_factor=0.18215)
  # attention_head_dim=8 is the NUMBER of heads here (as in diffusers' UNet2DConditionModel):
  # 8 heads of 4 dims at 32 channels, like the PyTorch run.
  spec.unet = dict(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=32, attention_head_dim=8)
  spec.text_encoder = dict(
      vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
      layer_norm_eps=1e-5)
  spec.image_encoder = dict(
      image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, projection_dim=32)
  spec.scheduler = dict(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
      steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")
  return spec
