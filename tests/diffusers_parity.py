"""Helpers of the UNet/VAE tests (test_models_unet.py, test_models_vae.py): errors, torch models.

Importing this module needs no torch; the functions that build PyTorch models import it.
"""
import numpy as np

from tests import helpers

# float32 parity bound against diffusers' PyTorch classes, as max |ours - torch| / max |torch|.
# Measured (CPU, XLA vs torch 2.13): tiny UNets 0.8e-6 (SD1.x-like), 1.4e-6 (SD2.x-like),
# 0.9e-6 (SDXL-like); tiny VAE 0.7e-6 (mean), 0.6e-6 (logvar), 2.2e-6 (decode): summation order
# of the convs, matmuls and norms. 1e-5 leaves margin for other CPUs' kernels.
FLOAT32_TOLERANCE = 1e-5
# Scale of the noise added to the torch init's constant parameters (norm weights 1, biases 0).
PERTURBATION_STD = 0.2


def load_golden_script():
  """tests/golden/make_diffusers_golden.py as a module (configs, inputs, file names)."""
  return helpers.load_script("tests/golden/make_diffusers_golden.py", "make_diffusers_golden")


def relative_error(actual, reference):
  """max |actual - reference| / max |reference| (shapes must agree)."""
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  return float(np.abs(actual - reference).max() / np.abs(reference).max())


def perturbed_torch_model(model_class, config, seed):
  """A diffusers PyTorch model of `config` with torch's random init, in eval mode, float32.

  Parameters that the init leaves constant (GroupNorm/LayerNorm weights 1 and biases 0, any
  zero-initialised layer) get N(0, 0.2^2) added, so no term vanishes trivially and a swapped or
  transposed norm parameter shows in the output.

  Returns:
    (torch module, {key: float32 np.ndarray} of its state dict).
  """
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  model = model_class(**config).eval()
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for parameter in model.parameters():
      if parameter.numel() == 1 or float(parameter.std()) == 0.0:
        parameter.add_(PERTURBATION_STD * torch.randn(parameter.shape, generator=generator))
  state_dict = {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}
  return model, state_dict


def trees_equal(first, second):
  """Same structure and bitwise-equal leaves."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.tree.structure(first) != jax.tree.structure(second):
    return False
  return all(jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), first, second)))
