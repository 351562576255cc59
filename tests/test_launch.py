"""The launch scripts: `bash -n`, shellcheck (skipped where it is not installed), and the
commands the TPU script's `--dry-run` prints."""
import os
import shutil
import subprocess

import pytest

from tests import helpers

SCRIPTS = ("launch/tpu_pod.sh", "launch/gpu_slurm.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", os.path.join(helpers.REPO, script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  result = subprocess.run(["shellcheck", os.path.join(helpers.REPO, script)],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def _dry_run(*args):
  return subprocess.run(
      ["bash", os.path.join(helpers.REPO, "launch/tpu_pod.sh"), *args],
      capture_output=True, text=True, cwd=helpers.REPO, timeout=60,
      env={**os.environ, "PATH": "/usr/bin:/bin"})  # no gcloud needed: nothing is run


def test_tpu_dry_run_prints_every_gcloud_command():
  result = _dry_run("--name", "tdpo-test", "--zone", "us-central2-b", "--accelerator", "v4-32",
                    "--project", "my-project", "--workdir", "/tmp/run", "--dry-run", "--",
                    "--config.num_epochs=3")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  gcloud = [line for line in lines if line.startswith("gcloud ")]
  where = "--zone=us-central2-b --project=my-project"
  assert gcloud[0] == ("gcloud compute tpus tpu-vm create tdpo-test " + where +
                       " --accelerator-type=v4-32 --version=tpu-ubuntu2204-base")
  # Copy + install on all workers, then train on all workers with jax.distributed.
  assert gcloud[1].startswith("gcloud compute tpus tpu-vm scp ")
  assert "--worker=all" in gcloud[1] and where in gcloud[1]
  install, run = gcloud[2], gcloud[3]
  for line in (install, run):
    assert line.startswith("gcloud compute tpus tpu-vm ssh tdpo-test " + where + " --worker=all")
  assert "pip install" in install and "jax[tpu]==" in install
  assert "python3 -m tdpo_jax.main --distributed --config=configs/sd15.py" in run
  assert "--workdir=/tmp/run --config.num_epochs=3" in run
  # Logs back from worker 0, then tear down.
  assert gcloud[4] == ("gcloud compute tpus tpu-vm scp --recurse tdpo-test:/tmp/run "
                       "./tpu_logs/tdpo-test " + where + " --worker=0")
  assert gcloud[5] == "gcloud compute tpus tpu-vm delete tdpo-test " + where + " --quiet"
  assert len(gcloud) == 6


def test_tpu_dry_run_v5e_and_keep():
  result = _dry_run("--name", "pod", "--zone", "us-west4-a", "--accelerator", "v5litepod-16",
                    "--keep", "--spot", "--dry-run")
  assert result.returncode == 0, result.stderr
  assert ("gcloud compute tpus tpu-vm create pod --zone=us-west4-a "
          "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot") in result.stdout
  assert "tpu-vm delete" not in result.stdout


def test_tpu_missing_argument_is_a_clear_error():
  result = _dry_run("--name", "pod", "--dry-run")
  assert result.returncode == 2
  assert result.stderr.strip() == "error: --zone is required"


def _install_line(result):
  lines = [line for line in result.stdout.splitlines()
           if line.startswith("gcloud compute tpus tpu-vm ssh") and "pip install" in line]
  assert len(lines) == 1, result.stdout
  return lines[0]


def test_tpu_bucket_workdir_installs_the_gcs_extra():
  """A gs:// workdir needs gcsfs (epath) and google-cloud-storage (orbax) on every worker: the
  install line asks for the package's `gcs` extra then, and only then."""
  common = ("--name", "pod", "--zone", "us-west4-a", "--accelerator", "v4-8", "--dry-run")
  bucket = _dry_run(*common, "--workdir", "gs://my-bucket/run")
  local = _dry_run(*common, "--workdir", "/tmp/run")
  assert bucket.returncode == 0 and local.returncode == 0, bucket.stderr + local.stderr
  assert "pip install -q -e '\\''.[gcs]'\\'' &&" in _install_line(bucket)
  assert "pip install -q -e . &&" in _install_line(local)
  assert "gcs" not in _install_line(local)
