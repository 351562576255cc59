"""TDPO-R on Stable Diffusion 1.5 with the paper's hyper-parameters (DESIGN §3).

Usage:
  python -m tdpo_jax.main --config=configs/sd15.py --workdir=/tmp/run
  python -m tdpo_jax.main --config=configs/sd15.py:algorithm=ddpo --config.sample.num_steps=20
  python -m tdpo_jax.main --config=configs/sd15.py:reward=hpsv2,sd14 --workdir=/tmp/hps14

The optional argument string is a comma-separated list of `key=value` presets:
  algorithm=ddpo|tdpo|tdpo_r  the algorithm (default tdpo_r);
  reward=aesthetic|pickscore|hpsv2  the paper's runs: aesthetic and pickscore train on
      simple_animals and evaluate on unseen_animals; hpsv2 trains on the hpsv2_photo prompts and
      evaluates on hpsv2_photo_eval. Every run is scored by all four of the paper's rewards
      (aesthetic, PickScore, HPSv2, ImageReward: cross-reward evaluation, `eval.*`), so
      overoptimisation of the trained one shows;
  sd14  Stable Diffusion 1.4 instead of 1.5;
  random  the SD 1.5 (and CLIP-L/14 critic tower) architectures with deterministic random
      weights ("tiny:0" built from `sd15_architecture()`: 1.37 B parameters, ~11 GB on disk),
      the JPEG reward and no evaluation: runs offline, for speed and memory measurements
      (benchmarks/accelerator.py).
"""
import ml_collections


def parse_arg(arg, **defaults):
  """Parses `"a=1,b"` into a ConfigDict over `defaults` (big_vision style presets)."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(defaults)}")
    parsed[key] = type(defaults[key])(value) if value else True
  return parsed


# The paper's runs: reward preset -> (training prompt set, held-out evaluation prompt set).
PAPER_PROMPTS = {
    "aesthetic": ("simple_animals", "unseen_animals"),
    "pickscore": ("simple_animals", "unseen_animals"),
    "hpsv2": ("hpsv2_photo", "hpsv2_photo_eval"),
}


def get_config(arg=None):
  args = parse_arg(arg, algorithm="tdpo_r", reward="aesthetic", sd14=False, random=False)
  if args.reward not in PAPER_PROMPTS:
    raise ValueError(f"unknown reward preset {args.reward!r}; expected one of "
                     f"{sorted(PAPER_PROMPTS)} (other rewards: --config.reward=NAME)")
  c = ml_collections.ConfigDict()
  c.seed = 42
  # ddpo: critic off, trajectory-level advantage. tdpo: critic on, no reset. tdpo_r: critic + reset.
  # grpo: ddpo with rewards standardised within groups of sample.group_size samples of a prompt.
  c.algorithm = args.algorithm
  c.num_epochs = 100

  # Model locations: a local diffusers-format directory, a hub id (where a hub is reachable), or
  # "tiny:<seed>" for a deterministic tiny random pipeline built on first use.
  c.pretrained = ml_collections.ConfigDict()
  c.pretrained.model = "CompVis/stable-diffusion-v1-4" if args.sd14 else "runwayml/stable-diffusion-v1-5"
  # Where converted weights are cached; "" = next to the originals.
  c.pretrained.cache_dir = ""
  # The critic's frozen CLIP image tower (the aesthetic reward's CLIP-L/14).
  c.pretrained.image_encoder = "openai/clip-vit-large-patch14"
  # The architecture of a "tiny:<seed>" model (a ConfigDict of diffusers / transformers configs
  # per component, configs/tiny.py `tiny_model_spec()`); None for a real pipeline.
  c.pretrained.tiny = None

  # A shipped prompt set name or a path to a text file (one per line).
  c.prompts, heldout_prompts = PAPER_PROMPTS[args.reward]
  # "aesthetic" (the paper's reward for simple_animals), "pickscore", "hpsv2",
  # "jpeg_compressibility", ...
  c.reward = args.reward
  # Modules imported before reward names are checked or built: each registers its own rewards
  # (`tdpo_jax.rewards.import_reward_modules`; e.g. "tdpo_jax.shapes.rewards", configs/shapes.py).
  c.reward_modules = ()
  # Weight locations of the model rewards: CLIP model / config / processor and tokenizer entries
  # are local directories or hub ids; `mlp` and `checkpoint` are local .safetensors files (the
  # published pickles are converted once with `python -m tdpo_jax.rewards.convert`).
  c.rewards = ml_collections.ConfigDict()
  c.rewards.aesthetic = dict(clip="openai/clip-vit-large-patch14", mlp="")
  c.rewards.pickscore = dict(model="yuvalkirstain/PickScore_v1", processor="")
  c.rewards.hpsv2 = dict(checkpoint="", clip_config="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
  # ImageReward in Flax on the mesh (tdpo_jax/rewards/image_reward.py): the converted
  # ImageReward.pt, BLIP's BERT tokenizer; architecture "ImageReward-v1.0" (ViT-L/16, BERT-base)
  # or a dict of ImageRewardConfig fields; compute dtype "float32" | "bfloat16".
  c.rewards.image_reward = dict(checkpoint="", tokenizer="google-bert/bert-base-uncased",
                                architecture="ImageReward-v1.0", dtype="float32")
  # The same model run by the `image-reward` PyTorch package on the host (not a dependency).
  c.rewards.imagereward = dict(model="ImageReward-v1.0", device="cuda")

  c.sample = ml_collections.ConfigDict()
  c.sample.num_steps = 50
  c.sample.eta = 1.0
  c.sample.guidance_scale = 5.0
  c.sample.height = 512
  c.sample.width = 512
  c.sample.batch_size = 64  # global images per rollout call
  c.sample.num_batches_per_epoch = 4  # 256 samples per epoch, as the paper
  # Samples of one prompt per group (consecutive); 0 = every sample's prompt drawn independently.
  # algorithm=grpo needs >= 2: its rewards are standardised within each group.
  c.sample.group_size = 0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8  # global micro-batch (paper: 1 per device x 8 devices)
  c.train.gradient_accumulation_steps = 16
  c.train.timestep_fraction = 1.0
  c.train.cfg = True
  c.train.learning_rate = 1e-4
  c.train.critic_learning_rate = 1e-4
  c.train.adam_beta1 = 0.9
  c.train.adam_beta2 = 0.999
  c.train.adam_weight_decay = 1e-4
  c.train.adam_epsilon = 1e-8
  c.train.max_grad_norm = 1.0
  c.train.clip_range = 1e-4
  c.train.value_clip_range = 0.2
  c.train.value_coef = 1.0
  c.train.adv_eps = 1e-8
  # KL to the pre-trained policy: "none" (paper), "return_penalty" (official code: subtract
  # 1/2 (log pi - log pi_ref)^2 from the return) or "gaussian" (closed form, in the loss).
  c.train.kl_mode = "none"
  c.train.kl_coef = 0.0
  # Evaluate the k micro-batches of one optimizer step as ONE batch of k x M transitions: the
  # same gradient (the mean of k equal-size micro-batch means is the mean over all k M), more
  # activation memory, fewer and larger kernels. Dropout masks of the critic are drawn once per
  # step instead of once per micro-batch (same distribution).
  c.train.fuse_micro_batches = False
  # Rematerialisation of the UNet in the train step: recompute its activations in the backward
  # pass instead of storing them (saves memory, costs ~1/3 more UNet FLOPs). "unet": one
  # jax.checkpoint around the UNet call; "blocks": one per down/mid/up block; "none".
  c.train.remat = "unet"

  c.lora = ml_collections.ConfigDict()
  c.lora.enabled = True  # False = full fine-tuning of the UNet
  c.lora.rank = 4
  c.lora.alpha = 4.0
  # Regexes on "/"-joined UNet parameter paths of the Dense kernels to adapt.
  c.lora.targets = (r".*attn[12]/to_(q|k|v|out_0)/kernel$",)

  # Compute dtypes ("float32" | "bfloat16"). policy: the UNet forward of the rollout and the
  # train step, over float32 master weights (gradients and the optimizer stay float32). frozen:
  # the text encoder, VAE, critic image encoder and the reference UNet of the KL return penalty.
  # Outputs are cast back to float32 (DDIM step, log-probs and losses are float32 throughout).
  c.precision = ml_collections.ConfigDict()
  c.precision.policy = "float32"
  c.precision.frozen = "float32"

  c.critic = ml_collections.ConfigDict()
  c.critic.hidden_sizes = (1024, 128, 64, 16)
  c.critic.dropout_rates = (0.2, 0.2, 0.1, 0.0)
  # The official critic has no nonlinearity between layers; "relu"/"gelu"/"silu" are options.
  c.critic.activation = "identity"
  c.critic.init_std = 0.0  # 0 = 1/(d+1), d the embedding width (DESIGN §3)
  # Images per VAE decode + image-encoder call when the critic embeds the epoch's N T states
  # (one lax.map inside the prepare kernel); 0 = all N T in one call.
  c.critic.embed_chunk_size = 256
  # With all states in one call (embed_chunk_size 0), that call split into this many independent
  # chains of ops (epoch.in_branches): XLA:CPU runs independent chains concurrently on its
  # threads; 1 on accelerators and meshes.
  c.critic.embed_branches = 1
  # With train.timestep_fraction < 1: embed (and value) only the (sample, timestep) pairs the
  # train phase uses; advantages are then standardised over those pairs only.
  c.critic.embed_train_timesteps_only = False
  # The frozen image tower the critic reads (tdpo_jax/critic_tower.py): "image_encoder" = the
  # pipeline's CLIP image tower (pretrained.image_encoder; the paper's, for the aesthetic reward).
  c.critic.tower = "image_encoder"
  # The epoch line's "late" explained variance pools the last ceil(late_fraction x T) states.
  c.critic.late_fraction = 0.3

  c.stats = ml_collections.ConfigDict()
  c.stats.buffer_size = 32
  c.stats.min_count = 16
  c.stats.eps = 1e-6
  # True: each prompt's own statistics once it has min_count rewards (the paper's runs). False:
  # always the batch's (DDPO's per_prompt_stat_tracking=False).
  c.stats.per_prompt = True

  c.reset = ml_collections.ConfigDict()
  c.reset.period = 10  # reset after epochs with (epoch + 1) % period == 0
  c.reset.tau = 0.0
  c.reset.target = "active"  # "active" = TDPO-R, "dormant" = ReDo
  c.reset.probe_size = 64

  # Device mesh (DESIGN §4): axes ("data", "fsdp"); -1 = the rest of the devices. Batches
  # (prompts per rollout, transitions per micro-batch) split over data x fsdp devices, so
  # sample.batch_size and train.batch_size must be multiples of data x fsdp.
  c.mesh = (("data", -1), ("fsdp", 1))
  c.num_devices = -1  # -1 = every device; n = the first n (single-process tests/debugging)
  c.sharding = ml_collections.ConfigDict()
  # Ordered (regex on the "/"-joined param path, spec); the first match wins. Paths start with
  # the tree they live in: unet/..., text_encoder/..., vae/..., image_encoder/... (frozen),
  # policy_params/..., policy_opt_state/..., critic_params/..., ... (train state). A spec is a
  # PartitionSpec as a tuple or "fsdp_largest" (the largest dim divisible by the fsdp size).
  c.sharding.rules = (
      # Conv/Dense kernels, embedding tables, their LoRA factors and Adam moments: over fsdp.
      (r"(^|/)(kernel|embedding)(/a|/b)?$", "fsdp_largest"),
      (r".*", ()),  # biases, norms, buffers, counters, RNG key: replicated
  )

  # Orbax checkpoints in <workdir>/checkpoints: the whole TrainState after every `every_epochs`
  # epochs (0 = only at the end and on SIGTERM), the latest `max_to_keep` kept (0 = all). A run
  # resumes automatically from the latest one in its workdir.
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_epochs = 1
  c.checkpoint.max_to_keep = 3
  c.checkpoint.async_save = True  # write in the background while the next epoch runs

  # Cross-reward evaluation (tdpo_jax/evaluation.py): every `every` epochs (0 = off) and after
  # the last one, the epoch's samples and `num_prompts` held-out prompts x `samples_per_prompt`
  # samples of the current policy (fixed key `seed`, so epochs compare) are scored by every
  # reward in `rewards`; `diversity` adds the mean pairwise CLIP-embedding cosine distance per
  # prompt (the critic's image encoder). Held-out samples are drawn in rollouts of
  # sample.batch_size (the last one padded), so 16 x 4 = 64 costs one rollout.
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 10
  c.eval.rewards = ("aesthetic", "pickscore", "hpsv2", "image_reward")  # the paper's four
  c.eval.prompts = heldout_prompts
  c.eval.num_prompts = 0  # 0 = the whole held-out set
  c.eval.samples_per_prompt = 4
  c.eval.seed = 2024
  c.eval.diversity = True
  # KL of the policy's sampling path to the pre-trained model's on the held-out samples (one
  # extra pair of guided UNet calls per step and sample): the "distance travelled".
  c.eval.kl_to_pretrained = True
  # Also evaluate the initial policy once before the first update (eval/before_training.*): the
  # common origin of every algorithm's curves.
  c.eval.before_training = True

  c.log = ml_collections.ConfigDict()
  c.log.image_grid_every = 1
  c.log.num_grid_images = 16
  c.log.progress = True
  # Optional Weights & Biases (not a dependency: `pip install wandb`); "" = W&B's default.
  c.log.wandb = ml_collections.ConfigDict()
  c.log.wandb.enabled = False
  c.log.wandb.project = "tdpo_jax"
  c.log.wandb.entity = ""
  c.log.wandb.name = ""
  if args.random:
    c.pretrained.model = "tiny:0"
    c.pretrained.image_encoder = ""  # the random pipeline's own image_encoder/
    c.pretrained.tiny = sd15_architecture()
    c.reward = "jpeg_compressibility"  # no reward weights offline
    c.eval.every = 0
    c.eval.before_training = False
  return c


def sd15_architecture():
  """runwayml/stable-diffusion-v1-5's UNet, VAE and CLIP-L text encoder (their config.json) and
  the critic's openai/clip-vit-large-patch14 vision tower, in the `pretrained.tiny` spec format
  (configs/tiny.py `tiny_model_spec()`): what `benchmarks/memory.py` compiles abstractly and the
  `random` preset builds with random weights."""
  spec = ml_collections.ConfigDict()
  spec.unet = dict(
      sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
      block_out_channels=(320, 640, 1280, 1280),
      down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
      cross_attention_dim=768, attention_head_dim=8)
  spec.vae = dict(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
      layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
  spec.text_encoder = dict(
      vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
      layer_norm_eps=1e-5)
  spec.image_encoder = dict(
      image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
      num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
  spec.scheduler = dict(
      num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
      prediction_type="epsilon", timestep_spacing="leading")
  return spec
