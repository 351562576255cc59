"""The shapes world (tdpo_jax.shapes): RL fine-tuning on it, its model, its pre-training.

`get_config(arg)`: the default job, the paper's main setting in this world. TDPO-R fine-tunes the
shipped shapes model (`tdpo_jax/shapes/assets/pipeline`, pre-trained by
`python -m tdpo_jax.shapes.pretrain`) against the shipped image-only "aesthetic" reward
(`tdpo_jax/shapes/assets/aesthetic.msgpack`: an affine head on a small image trunk fit to gold
QUALITY labels, as the LAION aesthetic predictor is an affine head on CLIP; its critic reads that
trunk), and scores every epoch by the rewards it was not trained on: gold, gold fidelity, gold
quality and the prompt-conditioned proxy (the cross-reward evaluation), plus diversity and KL to
the pre-trained model:

  python -m tdpo_jax.main --config=configs/shapes.py --workdir=/tmp/tdpo_shapes
  python -m tdpo_jax.main --config=configs/shapes.py:algorithm=ddpo,reward=proxy --workdir=...

Presets (comma-separated `key=value`):
  algorithm=tdpo_r|tdpo|ddpo|redo|ddpo_kl|grpo  redo = TDPO-R's loop resetting the critic's
      DORMANT neurons (ReDo, Sokar et al. 2023) instead of its active ones; ddpo_kl = DDPO with
      the per-step Gaussian KL to the pre-trained policy in the loss (weight KL_COEF); grpo =
      DDPO with rewards standardised within groups of GRPO_GROUP_SIZE samples of one prompt;
  reward=aesthetic|proxy|gold  what RL maximises: the image-only aesthetic reward (default), the
      prompt-conditioned learned proxy of gold (the second setting), or gold itself.
`shapes_model_spec()`: the model architecture. `pretrain_config()`: pre-training settings.
"""
import os

import ml_collections

from tdpo_jax.configs import sd15
from tdpo_jax.configs import tiny

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shapes",
                      "assets")
ALGORITHM_PRESETS = {
    # preset: (config.algorithm, reset.target, train.kl_mode)
    "tdpo_r": ("tdpo_r", "active", "none"),
    "tdpo": ("tdpo", "active", "none"),
    "ddpo": ("ddpo", "active", "none"),
    "redo": ("tdpo_r", "dormant", "none"),
    "ddpo_kl": ("ddpo", "active", "gaussian"),
    "grpo": ("grpo", "active", "none"),
}
# grpo: samples of one prompt per group (32 samples per epoch = 8 groups of 4).
GRPO_GROUP_SIZE = 4
# ddpo_kl: the per-step closed-form KL to the pre-trained policy in the loss, with this weight
# (not tuned: with it the path KL to the pre-trained model stayed at 0.27 over 40 epochs, 9-23
# for the unregularised algorithms).
KL_COEF = 0.1
# preset: (the reward RL maximises, the critic's image tower)
REWARD_PRESETS = {
    # The paper's main setting: an image-only learned "aesthetic" reward of gold quality; the
    # critic reads its trunk, as the paper's reads the aesthetic predictor's CLIP tower.
    "aesthetic": ("shapes_aesthetic", "shapes_aesthetic"),
    # The prompt-conditioned proxy of gold (prompt fidelity + quality); the pipeline's random
    # 32-d CLIP tower for the critic (no trained tower of this proxy is shipped).
    "proxy": ("shapes_proxy", "image_encoder"),
    "gold": ("shapes_gold", "image_encoder"),
}


def get_config(arg=None):
  """configs/tiny.py's loop on the shapes world: 32x32 images, world prompts, learned reward."""
  args = sd15.parse_arg(arg, algorithm="tdpo_r", reward="aesthetic")
  if args.algorithm not in ALGORITHM_PRESETS:
    raise ValueError(f"unknown algorithm preset {args.algorithm!r}; expected one of "
                     f"{sorted(ALGORITHM_PRESETS)}")
  if args.reward not in REWARD_PRESETS:
    raise ValueError(f"unknown reward preset {args.reward!r}; expected one of "
                     f"{sorted(REWARD_PRESETS)}")
  c = tiny.get_config()
  c.algorithm, c.reset.target, c.train.kl_mode = ALGORITHM_PRESETS[args.algorithm]
  c.train.kl_coef = KL_COEF if c.train.kl_mode != "none" else 0.0
  c.sample.group_size = GRPO_GROUP_SIZE if c.algorithm == "grpo" else 0
  c.seed = 0
  c.num_epochs = 12
  c.pretrained.model = os.path.join(ASSETS, "pipeline")
  c.pretrained.image_encoder = ""  # the pipeline's image_encoder/ (random, 32-d)
  c.pretrained.tiny = None  # a real pipeline directory (tiny's spec does not apply)
  c.prompts = "shapes_train"  # 8 world prompts (tdpo_jax/prompts/shapes_train.txt)
  c.reward, c.critic.tower = REWARD_PRESETS[args.reward]
  c.reward_modules = ("tdpo_jax.shapes.rewards",)  # registers shapes_gold*, _proxy, _aesthetic
  c.rewards.shapes_proxy = dict(weights=os.path.join(ASSETS, "proxy.msgpack"))
  c.rewards.shapes_aesthetic = dict(weights=os.path.join(ASSETS, "aesthetic.msgpack"))
  c.sample.num_steps = 10
  c.sample.height = 32
  c.sample.width = 32
  c.sample.batch_size = 16
  c.sample.num_batches_per_epoch = 2
  c.train.batch_size = 8
  c.train.gradient_accumulation_steps = 4  # 32 samples x 10 steps / (8 x 4) = 10 updates/epoch
  # ~4 samples per prompt per epoch (drawn with replacement): a prompt's own mean / std normalise
  # its rewards once its buffer holds 8, after about two epochs (before that, the batch's).
  c.stats.min_count = 8
  # LoRA rank 4 on the attention projections (sd15's). Probes on the shipped model
  # (docs/shapes.md): with all 72 world prompts at DDPO's LoRA lr 3e-4 the proxy stayed within
  # its epoch-to-epoch noise for 12 epochs; on these 8 prompts at 1e-3 the fixed-key proxy rose
  # by ~0.03 in 2 of 3 seeds (README). Full fine-tuning took 5x longer per epoch.
  c.train.learning_rate = 1e-3
  c.train.clip_range = 1e-4
  c.reset.period = 3
  if args.reward == "aesthetic":
    _aesthetic_setting(c)
  # Gold and proxy of every epoch's own samples (the overoptimisation curves), and of the training
  # prompts x 4 samples drawn with a fixed key (the same noise every epoch, so the curve moves
  # only with the policy).
  c.eval.every = 1
  # Cross-reward evaluation: gold and its two terms, both learned rewards.
  c.eval.rewards = ("shapes_gold", "shapes_gold_fidelity", "shapes_gold_quality",
                    "shapes_proxy", "shapes_aesthetic")
  c.eval.prompts = "shapes_train"
  c.eval.num_prompts = 0  # all 8
  c.eval.samples_per_prompt = 4
  c.log.num_grid_images = 16
  return c


def _aesthetic_setting(c):
  """What the aesthetic preset changes, each measured (docs/shapes.md); the proxy and gold presets
  keep the settings of the first shapes benchmark."""
  # An image-only reward, normalised by the batch's statistics: per-prompt statistics subtract
  # each prompt's mean, which an image-only critic can read only from a tower that recognises the
  # prompt (CLIP does in the paper; this trunk does not: held-out EV of the per-prompt-normalised
  # reward at x_1 was 0.02-0.15 against 0.97-1.00 batch-normalised, benchmarks/critic_fit.py).
  c.stats.per_prompt = False
  # The paper's clip 1e-4 clipped 75-87 % of the transitions here (an epoch makes 10 updates, the
  # paper's 100): the fixed-key aesthetic reward stayed at 0.851-0.860 for 12 epochs of TDPO-R.
  # With 1e-2 (clipfrac 0.06-0.11) DDPO's rose from 0.861 to ~0.88 by epoch 13 and stayed there.
  c.train.clip_range = 1e-2
  # The critic: the paper's lr (1e-4) reached a held-out late-state EV of 0.18 after 100 updates
  # and 0.61 after 300; 1e-3 reached 0.74 / 0.84 (benchmarks/critic_fit.py). An epoch makes 10
  # updates (the paper's 100), so 1e-3 and the paper's reset period of 10 epochs give the critic
  # 100 updates between resets.
  c.train.critic_learning_rate = 1e-3
  c.reset.period = 10


def shapes_model_spec():
  """Architecture of the shapes-world pipeline (diffusers / transformers config per component)."""
  spec = ml_collections.ConfigDict()
  spec.vae = dict(
      in_channels=3, out_channels=3, latent_channels=4,
      block_out_channels=(16, 32, 64),
      down_block_types=("DownEncoderBlock2D",) * 3,
      up_block_types=("UpDecoderBlock2D",) * 3,
      layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=1.0)
  # attention_head_dim is the NUMBER of heads (diffusers' UNet2DConditionModel naming).
  spec.unet = dict(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128),
      layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
      cross_attention_dim=64, attention_head_dim=4)
  # vocab_size / bos / eos ids come from the word-level tokenizer (tdpo_jax.shapes.model);
  # prompts are <= 7 words, so 16 positions hold every prompt with BOS/EOS.
  spec.text_encoder = dict(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=16, hidden_act="quick_gelu", layer_norm_eps=1e-5)
  spec.image_encoder = dict(
      image_size=32, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, projection_dim=32)
  # DDPM's linear schedule: terminal SNR alpha_bar_999 ~ 4e-5 (SD's scaled_linear leaves ~5e-3,
  # whose leaked mean colour tints small images); epsilon prediction, as the RL sampler needs.
  spec.scheduler = dict(
      num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
      beta_schedule="linear", clip_sample=False, set_alpha_to_one=False,
      steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")
  return spec


def pretrain_config():
  """Settings of `python -m tdpo_jax.shapes.pretrain` (configs/shapes_pretrain.py; `--steps` and
  `--batch` override a stage's steps / batch size)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data_seed = 1
  c.vae = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=32, learning_rate=1e-3, warmup_steps=100, schedule="cosine",
      weight_decay=0.0, grad_clip=1.0,  # AdamW's decay; the global-norm clip of the gradients
      kl_weight=1e-6,
      # latents are scaled by 1 / std so the UNet sees unit variance; std from this many images.
      scaling_images=1024))
  c.unet = ml_collections.ConfigDict(dict(
      # constant after warmup: a later session can extend --steps without a schedule change.
      steps=60000, batch_size=64, learning_rate=3e-4, warmup_steps=500, schedule="constant",
      weight_decay=0.0,
      grad_clip=1.0, ema_decay=0.999,
      prompt_dropout=0.1,   # P(empty prompt) while training, for classifier-free guidance
      offset_noise=0.1,     # std of per-channel constant noise added to eps (Guttenberg 2023)
      # the training set: this many world images, encoded once by the frozen VAE.
      dataset_size=16384, encode_batch_size=256))
  c.log_every = 50
  c.checkpoint_every = 200
  c.eval_every = 1000
  # Evaluation: samples of fixed prompts scored by the gold detector, with the RL sampler.
  c.eval = ml_collections.ConfigDict(dict(
      num_samples=64, num_steps=20, eta=1.0, guidance_scale=5.0, seed=1234))
  c.export_fp16 = True
  return c
