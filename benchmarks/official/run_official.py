"""Run the OFFICIAL TDPO-R training script (ZiyiZhang27/tdpo, scripts/train_tdpo.py) unmodified on
the tiny random pipeline built by build_tiny.py, and time each phase of every epoch.

The official source is imported/executed from its own checkout (--src); nothing of it is copied
here. Only hub loads, logging and the tiny-config knobs are patched (`PATCHES`, printed and
stored in the result JSON). Adapted from the project's reference harness;
benchmarks/side_by_side.py runs it.

usage:
  python run_official.py --src OFFICIAL_CHECKOUT --tiny TINY_SD_DIR --logdir LOGDIR \
      --out RESULT.json [--mode tdpo|ddpo] [--epochs 3] [--reset-freq 10]

--mode tdpo : TDPO-R exactly as the official default config (aesthetic preset) runs it, with the
              tiny sizes and the JPEG-compressibility reward.
--mode ddpo : the official repo has no DDPO entry point, so this is TDPO with the critic disabled:
              sampling uses the repo's own critic-free sampler (diffusers_patch/pipeline_with_logprob.py),
              residuals/values = 0 (so every step's advantage is the normalised trajectory reward, as in
              DDPO), critic loss coefficient 0, critic never evaluated, neuron statistics skipped.
"""
import argparse
import importlib.util
import inspect
import io
import json
import os
import resource
import sys
import threading
import time
import types
from collections import defaultdict

ap = argparse.ArgumentParser()
ap.add_argument("--src", required=True)
ap.add_argument("--tiny", required=True)
ap.add_argument("--logdir", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--mode", choices=["tdpo", "ddpo"], default="tdpo")
ap.add_argument("--epochs", type=int, default=3)
ap.add_argument("--reset-freq", type=int, default=10, help="official default: 10")
ap.add_argument("--seed", type=int, default=0)
ARGS = ap.parse_args()

SRC = os.path.abspath(ARGS.src)
TINY = os.path.abspath(ARGS.tiny)
CRITIC_DIM = 32  # projection_dim of the tiny CLIP vision encoder
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
sys.path.insert(0, SRC)

import numpy as np  # noqa: E402
import torch  # noqa: E402

PATCHES = []  # human-readable list, written to the result JSON


def patched(msg):
    if msg not in PATCHES:
        PATCHES.append(msg)


# ----------------------------------------------------------------------------------------------
# timing machinery
# ----------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.epoch = -1
        self.phase = "setup"
        self.events = []  # (time, epoch, name)
        self.acc = defaultdict(lambda: defaultdict(float))  # epoch -> key -> seconds
        self.cnt = defaultdict(lambda: defaultdict(int))
        self.rss = {}
        self.lock = threading.Lock()

    def now(self):
        return time.perf_counter()

    def event(self, name, epoch=None):
        self.events.append((self.now(), self.epoch if epoch is None else epoch, name))

    def add(self, key, dt, epoch=None, n=1):
        with self.lock:
            e = self.epoch if epoch is None else epoch
            self.acc[e][key] += dt
            self.cnt[e][key] += n


CLOCK = Clock()


def _count_optimizer_step(opt, args, kwargs):
    # global post-hook: counts real optimizer steps (AcceleratedOptimizer skips non-sync micro-batches)
    CLOCK.add(f"optimizer_steps_{len(opt.param_groups[0]['params'])}params", 0.0)


from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

register_optimizer_step_post_hook(_count_optimizer_step)
PIPE_STATE = {"in_pipe": False, "decode_idx": 0, "post_idx": 0, "nsteps": 0}
LOGGED = []


def timed_tqdm(iterable=None, *args, desc="", **kwargs):
    """Replacement for the train script's module-level `tqdm`: no bars, phase markers instead."""
    return _TimedIter(iterable, desc or "")


class _TimedIter:
    def __init__(self, iterable, desc):
        self.iterable, self.desc = iterable, desc

    def __iter__(self):
        d = self.desc
        phase = None
        if d.startswith("Epoch ") and d.endswith(": sampling"):
            CLOCK.epoch = int(d[len("Epoch "):-len(": sampling")])
            phase = "sampling"
        elif d == "Waiting for rewards":
            phase = "reward_wait"
        elif d.startswith("Epoch ") and d.endswith(": training"):
            phase = "training"
        if phase:
            CLOCK.phase = phase
            CLOCK.event(phase + "_start")
        for x in self.iterable:
            yield x
        if phase:
            CLOCK.event(phase + "_end")
            CLOCK.phase = "after_" + phase


def _timed_call(fn, key_fn):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        key = key_fn()
        if key:
            CLOCK.add(key, time.perf_counter() - t)
        return out

    return wrapper


# ----------------------------------------------------------------------------------------------
# stub modules the official code imports at top level but never uses on this path
# ----------------------------------------------------------------------------------------------
# import the heavy libraries first so that their import-time "is wandb installed?" probes see the
# real (absent) package, then register the stub (with a spec, for later importlib.util.find_spec).
import importlib.machinery  # noqa: E402
import accelerate.tracking  # noqa: E402,F401
import diffusers  # noqa: E402,F401
import transformers.models.clip.modeling_clip  # noqa: E402,F401

wandb = types.ModuleType("wandb")
wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)


class _WandbImage:
    def __init__(self, path, caption=None):
        self.path, self.caption = path, caption


wandb.Image = _WandbImage
sys.modules["wandb"] = wandb
patched("wandb: stub module (wandb.Image only); Accelerator built with log_with=None and .log() "
        "captured locally (train_tdpo.py:23,105,466/660)")


def _no_hub(*a, **k):
    raise RuntimeError("hpsv2 is not available in this benchmark (no hub access)")


hpsv2 = types.ModuleType("hpsv2")
hpsv2.score = _no_hub
hpsv2_src = types.ModuleType("hpsv2.src")
hpsv2_oc = types.ModuleType("hpsv2.src.open_clip")
hpsv2_oc.create_model_and_transforms = _no_hub
hpsv2_oc.get_tokenizer = _no_hub
hpsv2.src = hpsv2_src
hpsv2_src.open_clip = hpsv2_oc
sys.modules.update({"hpsv2": hpsv2, "hpsv2.src": hpsv2_src, "hpsv2.src.open_clip": hpsv2_oc})
patched("hpsv2 / hpsv2.src.open_clip: stub modules (critic_model.py:6-7 imports them at top level; "
        "only used for reward_name1 == 'hpsv2')")

# ----------------------------------------------------------------------------------------------
# official modules
# ----------------------------------------------------------------------------------------------
import tdpo_pytorch.critic_model as critic_model  # noqa: E402
import tdpo_pytorch.rewards as rewards  # noqa: E402
import tdpo_pytorch.neuron_recycler as neuron_recycler  # noqa: E402
import tdpo_pytorch.diffusers_patch.pipeline_with_logprob_tdpo as pwl_tdpo  # noqa: E402
import tdpo_pytorch.diffusers_patch.pipeline_with_logprob as pwl_ddpo  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessor,
    CLIPProcessor,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)
from diffusers import StableDiffusionPipeline  # noqa: E402

# --- critic image encoder: openai/clip-vit-large-patch14 -> tiny CLIPVisionModelWithProjection ---
HUB_REQUESTS = []


class _TinyCLIPImageFeatures(torch.nn.Module):
    """Exposes CLIPModel.get_image_features on top of the tiny CLIPVisionModelWithProjection."""

    def __init__(self, path):
        super().__init__()
        self.vision = CLIPVisionModelWithProjection.from_pretrained(path)

    def get_image_features(self, pixel_values=None, **kw):
        return self.vision(pixel_values=pixel_values).image_embeds


def _tiny_clip_model(name, *a, **k):
    HUB_REQUESTS.append(("CLIPModel", name))
    return _TinyCLIPImageFeatures(os.path.join(TINY, "image_encoder"))


def _tiny_clip_processor(name, *a, **k):
    HUB_REQUESTS.append(("CLIPProcessor", name))
    return CLIPProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(os.path.join(TINY, "image_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(TINY, "tokenizer")),
    )


critic_model.CLIPModel = types.SimpleNamespace(from_pretrained=_tiny_clip_model)
critic_model.CLIPProcessor = types.SimpleNamespace(from_pretrained=_tiny_clip_processor)
patched("critic_model.CLIPModel/CLIPProcessor.from_pretrained('openai/clip-vit-large-patch14') -> tiny "
        "CLIPVisionModelWithProjection (get_image_features = image_embeds) + CLIPImageProcessor 32x32 "
        "(critic_model.py:48,82)")

# --- critic MLP input width 768 -> 32 (textual patch of the official class, nothing else changed) ---
_mlp_src = inspect.getsource(critic_model.MLP)
assert _mlp_src.count("self.input_size = 768") == 1
_ns = dict(vars(critic_model))
exec(compile(_mlp_src.replace("self.input_size = 768", f"self.input_size = {CRITIC_DIM}"),
             critic_model.__file__, "exec"), _ns)
critic_model.MLP = _ns["MLP"]
patched(f"critic_model.MLP: input_size 768 -> {CRITIC_DIM} (critic_model.py:18; widths "
        f"{CRITIC_DIM}->1024->128->64->16->1, init std 1/({CRITIC_DIM}+1) as official)")


class TinyNeuronRecycler(neuron_recycler.NeuronRecycler):
    def __init__(self, accelerator, dormant_threshold=0.0, input_size=768):
        super().__init__(accelerator, dormant_threshold, CRITIC_DIM)


patched(f"NeuronRecycler input_size 768 -> {CRITIC_DIM} (train_tdpo.py:330-334; re-init std of reset "
        "neurons)")

# --- critic timing (only counted while sampling; the training loop's get_residual is training) ---
_orig_embed = critic_model.CriticModel.get_image_embed
_orig_resid = critic_model.CriticModel.get_residual


def _get_image_embed(self, images):
    t = time.perf_counter()
    out = _orig_embed(self, images)
    if CLOCK.phase == "sampling":
        CLOCK.add("critic_embed", time.perf_counter() - t)
    return out


def _get_residual(self, embed):
    if ARGS.mode == "ddpo":
        return torch.zeros(embed.shape[0], dtype=embed.dtype, device=embed.device)
    t = time.perf_counter()
    out = _orig_resid(self, embed)
    if CLOCK.phase == "sampling":
        CLOCK.add("critic_value", time.perf_counter() - t)
    return out


critic_model.CriticModel.get_image_embed = _get_image_embed
critic_model.CriticModel.get_residual = _get_residual


# --- rewards ---
def jpeg_compressibility(dtype, device):
    """ddpo-pytorch rewards.jpeg_compressibility: -(JPEG size in kB), PIL quality 95."""
    from PIL import Image

    def _fn(images, prompts, metadata):
        t = time.perf_counter()
        if isinstance(images, torch.Tensor):
            images = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
        images = [Image.fromarray(image) for image in images]
        buffers = [io.BytesIO() for _ in images]
        for image, buffer in zip(images, buffers):
            image.save(buffer, format="JPEG", quality=95)
        sizes = [buffer.tell() / 1000 for buffer in buffers]
        CLOCK.add("reward_fn", time.perf_counter() - t)
        return -np.array(sizes), {}

    return _fn


def zero_reward(dtype, device):
    def _fn(images, prompts, metadata):
        return np.zeros(len(prompts)), {}

    return _fn


rewards.jpeg_compressibility = jpeg_compressibility
rewards.zero_reward = zero_reward
patched("rewards: reward_fn1 = jpeg_compressibility (added to tdpo_pytorch.rewards, ddpo-pytorch code); "
        "the three cross-reward evaluation rewards reward_fn2..4 (ImageReward/PickScore/HPSv2 in the "
        "official config) need hub weights -> 'zero_reward' (returns zeros, ~0 s)")

# --- sampler: state for attributing the per-step VAE decode to the critic ---
_orig_pwl_tdpo = pwl_tdpo.pipeline_with_logprob


def _pwl_timed(self, *a, **kw):
    PIPE_STATE.update(in_pipe=True, decode_idx=0, post_idx=0, nsteps=kw.get("num_inference_steps", 50))
    try:
        if ARGS.mode == "ddpo":
            kw.pop("ref_model", None)
            kw.pop("critic_model", None)
            images, nsfw, latents, log_probs = pwl_ddpo.pipeline_with_logprob(self, *a, **kw)
            b = images.shape[0]
            embeds = [torch.zeros(b, CRITIC_DIM) for _ in log_probs]
            residuals = [torch.zeros(b) for _ in log_probs]
            return images, nsfw, latents, log_probs, embeds, residuals
        return _orig_pwl_tdpo(self, *a, **kw)
    finally:
        PIPE_STATE["in_pipe"] = False


pwl_tdpo.pipeline_with_logprob = _pwl_timed
if ARGS.mode == "ddpo":
    patched("DDPO mode: sampler = official critic-free diffusers_patch/pipeline_with_logprob.py; "
            "image_embeds = 0, residuals = 0; CriticModel.get_residual -> 0; train.cf_coef = 0; "
            "NeuronRecycler init/update skipped")


def _attributed_timer(fn, index_key, name):
    """`fn` timed, its seconds counted as critic_<name> for the first `nsteps` calls of a TDPO
    sampling call (the per-step critic images) and as final_<name> after them."""

    def timed(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        dt = time.perf_counter() - t
        if PIPE_STATE["in_pipe"]:
            critic_step = ARGS.mode == "tdpo" and PIPE_STATE[index_key] < PIPE_STATE["nsteps"]
            CLOCK.add(("critic_" if critic_step else "final_") + name, dt)
            PIPE_STATE[index_key] += 1
        return out

    return timed


def _install_pipeline_timers(pipe):
    pipe.vae.decode = _attributed_timer(pipe.vae.decode, "decode_idx", "decode")
    pipe.image_processor.postprocess = _attributed_timer(pipe.image_processor.postprocess,
                                                         "post_idx", "postprocess")

    unet_t = {}

    def pre(mod, inp):
        unet_t["t"] = time.perf_counter()

    def post(mod, inp, out):
        dt = time.perf_counter() - unet_t["t"]
        CLOCK.add("unet_fwd_" + CLOCK.phase, dt)
        if os.environ.get("TDPO_BENCH_TRACE"):
            x = inp[0].detach()
            print(f"[trace] unet {CLOCK.phase} {tuple(x.shape)} {dt:.4f}s max|x|={x.abs().max():.3g} "
                  f"tiny={(x.abs() < 1e-30).sum().item()} max|out|={out[0].detach().abs().max():.3g}",
                  file=sys.stderr)

    pipe.unet.register_forward_pre_hook(pre)
    pipe.unet.register_forward_hook(post)

    orig_pb = pipe.set_progress_bar_config

    def set_progress_bar_config(**kw):
        kw["disable"] = True
        return orig_pb(**kw)

    pipe.set_progress_bar_config = set_progress_bar_config


class _TinySDLoader:
    @staticmethod
    def from_pretrained(name, *a, **kw):
        HUB_REQUESTS.append(("StableDiffusionPipeline", name))
        kw.pop("revision", None)
        pipe = StableDiffusionPipeline.from_pretrained(TINY, **kw)
        _install_pipeline_timers(pipe)
        return pipe


patched("StableDiffusionPipeline.from_pretrained('CompVis/stable-diffusion-v1-4') -> tiny local "
        "pipeline (train_tdpo.py:129); pipeline progress bars disabled")

# ----------------------------------------------------------------------------------------------
# the official training script, executed from its checkout
# ----------------------------------------------------------------------------------------------
spec = importlib.util.spec_from_file_location("train_tdpo", os.path.join(SRC, "scripts", "train_tdpo.py"))
train = importlib.util.module_from_spec(spec)
sys.modules["train_tdpo"] = train
spec.loader.exec_module(train)

_OfficialAccelerator = train.Accelerator


def _to_jsonable(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return v.tolist() if v.size > 1 else float(v)
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, list):
        return [_to_jsonable(x) for x in v]
    return repr(type(v))


class LocalAccelerator(_OfficialAccelerator):
    def __init__(self, *a, **kw):
        kw["log_with"] = None
        super().__init__(*a, **kw)

    def log(self, values, step=None, log_kwargs={}):
        if "images" in values:
            CLOCK.event("log_images")
        elif "inner_epoch" in values:
            CLOCK.event("log_train")
            CLOCK.phase = "after_train_log"
        elif "epoch" in values:
            CLOCK.event("log_epoch_info")
        LOGGED.append({"step": step, "epoch": CLOCK.epoch,
                       **{k: _to_jsonable(v) for k, v in values.items() if k != "images"}})

    def save_state(self, *a, **kw):
        t = time.perf_counter()
        out = super().save_state(*a, **kw)
        CLOCK.add("checkpoint_save", time.perf_counter() - t)
        return out


train.Accelerator = LocalAccelerator
train.StableDiffusionPipeline = _TinySDLoader
train.NeuronRecycler = TinyNeuronRecycler
train.tqdm = timed_tqdm
if ARGS.mode == "ddpo":
    TinyNeuronRecycler.init = lambda self, model, use_lora=False: None
    TinyNeuronRecycler.update = lambda self, *a, **k: (0, 0, 0.0, 0.0)


def configure(c):
    # tiny benchmark knobs (everything else: official config/config_tdpo.py:aesthetic)
    c.seed = ARGS.seed
    c.num_epochs = ARGS.epochs
    c.mixed_precision = "no"
    c.logdir = os.path.abspath(ARGS.logdir)
    c.run_name = "tiny_" + ARGS.mode
    c.sample.num_steps = 10
    c.sample.eta = 1.0
    c.sample.guidance_scale = 5.0
    c.sample.batch_size = 4
    c.sample.num_batches_per_epoch = 2
    c.sample.neuron_reset_freq = ARGS.reset_freq
    c.train.batch_size = 2
    c.train.gradient_accumulation_steps = 4  # 8 samples / 2 per micro-batch = 4 -> 1 step per timestep pass
    c.reward_fn1 = "jpeg_compressibility"
    c.reward_name1 = "jpeg_compressibility"
    for i in (2, 3, 4):
        setattr(c, f"reward_fn{i}", "zero_reward")
        setattr(c, f"reward_name{i}", f"unused_eval_reward{i}")
    if ARGS.mode == "ddpo":
        c.train.cf_coef = 0
        c.sample.neuron_reset_critic = False


from absl import app  # noqa: E402


def _main(argv):
    cfg = train.FLAGS.config
    configure(cfg)
    CLOCK.event("main_start")
    train.main(argv)
    CLOCK.event("main_end")
    report(cfg)


def report(cfg):
    ev = CLOCK.events
    epochs = sorted({e for _, e, n in ev if n == "sampling_start"})

    def t_of(name, e):
        xs = [t for t, ee, n in ev if n == name and ee == e]
        return xs[0] if xs else None

    starts = {e: t_of("sampling_start", e) for e in epochs}
    rows = []
    for e in epochs:
        end = starts.get(e + 1) or [t for t, _, n in ev if n == "main_end"][0]
        a = CLOCK.acc[e]
        samp_wall = t_of("sampling_end", e) - starts[e]
        critic = a["critic_decode"] + a["critic_postprocess"] + a["critic_embed"] + a["critic_value"]
        rwait = t_of("reward_wait_end", e) - t_of("reward_wait_start", e)
        train_loop = t_of("training_end", e) - t_of("training_start", e)
        neuron = t_of("log_train", e) - t_of("training_end", e)
        total = end - starts[e]
        row = {
            "epoch": e,
            "total": total,
            "sampling_excl_critic": samp_wall - critic,
            "sampling_loop_wall": samp_wall,
            "critic": critic,
            "critic_decode": a["critic_decode"],
            "critic_postprocess": a["critic_postprocess"],
            "critic_embed": a["critic_embed"],
            "critic_value": a["critic_value"],
            "unet_fwd_sampling": a["unet_fwd_sampling"],
            "final_decode": a["final_decode"],
            "reward_fn_in_threads": a["reward_fn"],
            "reward_wait_main": rwait,
            "training": train_loop + neuron,
            "training_loop": train_loop,
            "neuron_stats": neuron,
            "unet_fwd_training": a["unet_fwd_training"],
            "checkpoint_save": a["checkpoint_save"],
            "other": total - samp_wall - rwait - train_loop - neuron,
            "peak_rss_mib": CLOCK.rss.get(e),
            "optimizer_steps": {k: v for k, v in CLOCK.cnt[e].items() if k.startswith("optimizer_steps")},
        }
        rows.append(row)
    setup = starts[epochs[0]] - [t for t, _, n in ev if n == "main_start"][0]
    res = {
        "mode": ARGS.mode,
        "epochs": rows,
        "setup_s": setup,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "hub_requests_redirected": HUB_REQUESTS,
        "patches": PATCHES,
        "config": json.loads(cfg.to_json_best_effort()),
        "logged": LOGGED,
    }
    with open(ARGS.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    keys = ["total", "sampling_excl_critic", "critic", "reward_fn_in_threads", "reward_wait_main",
            "training", "other", "peak_rss_mib"]
    print(f"\n== {ARGS.mode}: seconds per epoch ==")
    print("epoch " + " ".join(f"{k:>22}" for k in keys))
    for r in rows:
        print(f"{r['epoch']:5d} " + " ".join(f"{(r[k] or 0):22.3f}" for k in keys))


# peak RSS after every epoch (sampled at each training-log call)
_orig_log = LocalAccelerator.log


def _log_with_rss(self, values, step=None, log_kwargs={}):
    _orig_log(self, values, step, log_kwargs)
    if "inner_epoch" in values:
        CLOCK.rss[CLOCK.epoch] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


LocalAccelerator.log = _log_with_rss

if __name__ == "__main__":
    app.run(_main, argv=[sys.argv[0], f"--config={os.path.join(SRC, 'config', 'config_tdpo.py')}:aesthetic"])
