"""Multi-process (DDP) training of every bundle: ``configs/multi_gpu_train.json`` run under torchrun.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node=N -m monai.bundle run``
as a subprocess (CPU, gloo backend) on the tiny phantom dataset, with the overlay's opt-in
``dist_dump_dir``: after training EVERY rank writes its (DDP-unwrapped) weights to ``rank{r}.pt``,
which is how rank 1's weights can be checked although only rank 0 writes checkpoints.

What is checked:

- rank consistency (all four bundles): both ranks end with identical parameters (exact equality);
- rank-0 outputs: ``models/`` holds only rank 0's files (``last.pt``, ``model.pt``) with plain,
  unprefixed keys, and no TensorBoard file was left behind by another rank; statically, every
  logging / TensorBoard / checkpoint handler is disabled on ranks > 0 (so it is not even
  instantiated) while validation, LR schedule, bin schedule and sampler reseeding run on every rank;
- equivalence (slice_localization, flow_generation with its GAN pair, mrngan): 2 processes x
  per-process batch B give the same weights as 1 process x batch 2B, within float tolerance, after
  one epoch of 3 optimizer steps on the same samples;
- resume (brain_generalization): a second 2-process run with more epochs continues from rank 0's
  ``last.pt`` on every rank.

Why the equivalence runs pin some settings (the overlays' defaults are for real training):

- sampling must be deterministic and identical: ``DistributedSampler(shuffle=False)`` gives rank r
  the volumes r, r + 2, r + 4 ...; with per-process batch B = 1 volume, step k sees volumes 2k and
  2k + 1 on the two ranks, exactly the volumes of step k of one process with batch 2 and no shuffle.
  Every slice (pair, run) of a volume is used (``num_samples`` null) instead of random ones, and
  random augmentations are off, because each rank draws its own random numbers (seed + rank).
- DDP averages the per-rank gradients of per-rank mean losses; with equal per-rank sample counts
  that is the gradient of the mean loss over the global batch, so Adam takes the same steps.
- dropout is off (masks are per-process random numbers).
- BatchNorm normalises with per-process batch statistics; SyncBatchNorm (which the overlays switch
  on with a GPU) has no CPU implementation. So with gloo the BatchNorm discriminator of
  flow_generation is NOT equivalent to one process: the equivalence run gives it instance norm
  instead; the localizer used (LocalizerCNN) and the MRNGAN cell have no BatchNorm. The BatchNorm
  running statistics also differ between ranks (each rank updates rank 0's broadcast buffers with
  its own batch in the last forward), so the rank-consistency check compares parameters exactly
  and leaves out ``running_mean`` / ``running_var`` / ``num_batches_tracked`` (the latter differs in
  brain_generalization's ``dcgan_set`` route, where a rank may have no slice of a bin in a batch).
- brain_generalization is not compared with one process: every rank draws its own latent vectors
  (by design: identical latents on all ranks would waste the larger global batch), so the two runs
  see different latents; its test checks rank consistency, rank-0 outputs and resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_brain_generalization import TINY as BRAIN_TINY
from test_flow_generation import TINY as FLOW_TINY

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
LAUNCH_TIMEOUT_S = 240  # a DDP deadlock must fail the test, not hang it
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


# ------------------------------------------------------------------------------------------ helpers
def torchrun(bundle: str, nproc: int, overrides: dict, workdir: Path) -> float:
    """Run ``train.json`` + ``multi_gpu_train.json`` of ``bundle`` on ``nproc`` CPU processes; returns seconds."""
    root = BUNDLES / bundle
    args = {"config_file": [str(root / "configs" / "train.json"), str(root / "configs" / "multi_gpu_train.json")],
            "bundle_root": str(root), **overrides}
    workdir.mkdir(parents=True, exist_ok=True)
    args_file = workdir / f"args_{nproc}proc.json"
    args_file.write_text(json.dumps(args, indent=1))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "monai.bundle", "run", "--args_file", str(args_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started (their own session)
        out, _ = proc.communicate()
        pytest.fail(f"{bundle}: {nproc}-process run did not finish in {LAUNCH_TIMEOUT_S} s (deadlock?)\n{out[-4000:]}")
    assert proc.returncode == 0, f"{bundle}: {nproc}-process run failed\n{out[-6000:]}"
    return time.monotonic() - start


def load_dumps(folder: Path, world_size: int) -> list[dict]:
    dumps = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    assert [(d["rank"], d["world_size"]) for d in dumps] == [(r, world_size) for r in range(world_size)]
    return dumps


def assert_ranks_identical(dumps: list[dict]) -> None:
    """Every parameter and non-BatchNorm-statistics buffer is bit-identical on every rank."""
    ref = dumps[0]
    for other in dumps[1:]:
        assert other["iteration"] == ref["iteration"]
        assert set(other["state_dict"]) == set(ref["state_dict"])
        for net, state in ref["state_dict"].items():
            assert list(other["state_dict"][net]) == list(state)
            for key, value in state.items():
                if key.endswith(BN_STATS):
                    continue
                assert torch.equal(other["state_dict"][net][key], value), f"rank {other['rank']}: {net}.{key} differs from rank 0"


def events_files(output_dir: Path) -> dict[str, int]:
    """TensorBoard event files per folder (relative), each checked to hold at least one summary."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    counts: dict[str, int] = {}
    for f in sorted(output_dir.rglob("events.out.tfevents*")):
        assert any(ev.HasField("summary") for ev in EventFileLoader(str(f)).Load()), f"{f}: no summaries (a writer of rank > 0?)"
        rel = str(f.parent.relative_to(output_dir))
        counts[rel] = counts.get(rel, 0) + 1
    return counts


def assert_plain_checkpoint(path: Path, nets: list[str]) -> dict:
    """``last.pt`` written under DDP has unprefixed keys, so it also resumes a single-process run."""
    state = torch.load(path, weights_only=True)
    for net in nets:
        assert state[net] and not any(k.startswith("module.") for k in state[net]), f"{path}: {net} keys carry 'module.'"
    return state


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def flow_weights(tmp_path_factory) -> tuple[Path, dict]:
    """Initialised (random, non-trivial) pix2pix weights for the mrngan stage, read through flow_generation's config."""
    from monai_mrngan.inference.components import load_bundle_network

    overrides = {"unet_channels": [4, 8]}
    gen = load_bundle_network(BUNDLES / "flow_generation" / "configs" / "inference.json", None, overrides=overrides)
    torch.manual_seed(0)
    with torch.no_grad():
        for prm in gen.parameters():
            prm.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("flow_stage") / "model.pt"
    torch.save(gen.state_dict(), path)
    return path, overrides


def _equivalence_case(bundle: str, flow_weights: tuple[Path, dict]) -> tuple[dict, list[str]]:
    """Deterministic tiny overrides (see the module docstring) and the networks to compare."""
    if bundle == "slice_localization":
        return {
            "spatial_size": [32, 32],
            "network_def": {"_target_": "monai_mrngan.networks.localizers.LocalizerCNN", "spatial_size": "@spatial_size",
                            "filters": [8, 8, 4, 1], "hidden": 16},
            "slices_per_volume": None,  # all 24 slices of each volume, in order
            "train#augmentation#0#prob": 0.0,
            "train#augmentation#1#prob": 0.0,
            "train#augmentation#2#prob": 0.0,
        }, ["network"]
    if bundle == "flow_generation":
        return {
            **FLOW_TINY,
            "samples_per_volume": None,  # all 23 slice pairs of each volume (direction +1)
            "train#random_transforms": [],
            "dropout": 0.0,
            "discriminator_def#norm": "INSTANCE",  # BatchNorm is per-process on CPU: not equivalent
            # a random (not zero-initialised) output head, so the UNet's weights get real gradients from step 1
            "network_def#zero_init": False,
            # the conv biases in front of instance norm have mathematically zero gradients (the norm removes
            # them): what is computed is rounding noise, which Adam with eps 1e-8 scales up to full
            # learning-rate steps in random directions; a larger eps keeps Adam from amplifying that noise
            "goptimizer#eps": 1e-3,
            "doptimizer#eps": 1e-3,
        }, ["gnetwork", "dnetwork"]
    if bundle == "mrngan":
        path, overrides = flow_weights
        return {
            "flow_ckpt": str(path),
            "flow_overrides": overrides,
            "prior": "$monai_mrngan.atlas.prior.mean_prior(@dataset_dir, 'training')",
            "run_length": 4,
            "runs_per_volume": None,  # all 21 runs of 4 slices of each volume (direction +1)
            "position_noise": 0.0,
            "val_runs_per_volume": 2,
            "network_def#hidden_channels": 4,
            "network_def#features": 4,
        }, ["network"]
    raise ValueError(bundle)


# ------------------------------------------------------------------------------------------ tests
# handlers that write files or log (rank 0 only) and handlers every rank needs
WRITERS = {"StatsHandler", "TensorBoardStatsHandler", "TensorBoardImageHandler", "PositionFigureHandler",
           "GeneratedGridHandler", "BestCheckpoint", "CheckpointSaver"}
ALL_RANKS = {"ValidationHandler", "LrScheduleHandler", "BinSchedule", "ReseedSampler"}


class _Rank1:
    @staticmethod
    def get_rank() -> int:
        return 1


def _attached_on_rank1(handlers: list, selection: str, ref: str) -> list[str]:
    """Names of the handlers a rank > 0 attaches: ``_disabled_`` on rank > 0 drops an entry (and with it
    the instantiation, so no TensorBoard writer is even opened), then the trainer/evaluator's selection."""
    kept = []
    for h in handlers:
        if isinstance(h, dict):
            if "dist.get_rank() > 0" in str(h.get("_disabled_", "")):
                continue
            kept.append(h["_target_"].rsplit(".", 1)[-1])
        else:
            kept.append(h)  # a reference such as "@best": shared with the resume checkpoint, not disabled
    if selection == ref:
        return kept
    assert selection.startswith("$") and "dist.get_rank()" in selection, selection
    return eval(selection[1:].replace(ref, "H"), {"dist": _Rank1, "H": kept})  # noqa: S307 - our own config


@pytest.mark.parametrize("bundle", ["slice_localization", "brain_generalization", "flow_generation", "mrngan"])
def test_overlay_parses_rank0_handlers_and_dump_off_by_default(bundle):
    from monai.bundle import ConfigParser

    cfg = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(cfg / "train.json"), str(cfg / "multi_gpu_train.json")])
    assert parser["dist_dump_dir"] is None
    assert parser["train"]["dataloader"]["sampler"] == "@train#dist_sampler"
    assert parser["train"]["dist_sampler"]["_target_"] == "DistributedSampler"
    assert parser["train"]["dataloader"]["shuffle"] is False
    assert any("dist_dump_dir" in step for step in parser["run"]) and parser["finalize"]
    for section, selection, ref in (("train", parser["train"]["trainer"]["train_handlers"], "@train#handlers"),
                                    ("validate", parser["validate"]["evaluator"]["val_handlers"], "@validate#handlers")):
        handlers = parser[section]["handlers"]
        # a writer only sliced out of the attached list would still be instantiated (and open an events file)
        not_disabled = [h["_target_"] for h in handlers if isinstance(h, dict) and h["_target_"].rsplit(".", 1)[-1] in WRITERS
                        and "dist.get_rank() > 0" not in str(h.get("_disabled_", ""))]
        assert not not_disabled, f"{bundle} {section}: not disabled on rank > 0: {not_disabled}"
        on_rank1 = _attached_on_rank1(handlers, selection, ref)
        assert not [h for h in on_rank1 if h in WRITERS or h.startswith("@")], f"{bundle} {section}: rank 1 attaches {on_rank1}"
        needed = {h["_target_"].rsplit(".", 1)[-1] for h in handlers if isinstance(h, dict)} & ALL_RANKS
        assert needed <= set(on_rank1), f"{bundle} {section}: every rank needs {needed}, rank 1 attaches {on_rank1}"


@pytest.mark.parametrize("bundle", ["slice_localization", "flow_generation", "mrngan"])
def test_two_processes_equal_one_process_with_the_global_batch(bundle, tiny_dataset, tmp_path, flow_weights):
    case, nets = _equivalence_case(bundle, flow_weights)
    base = {**case, "dataset_dir": str(tiny_dataset), "epochs": 1, "train#dist_sampler#shuffle": False}
    runs = {}
    for nproc, per_process_batch in ((2, 1), (1, 2)):  # global batch 2 volumes either way
        out = tmp_path / f"{nproc}proc"
        seconds = torchrun(bundle, nproc, {**base, "volumes_per_batch": per_process_batch, "ckpt_dir": str(out / "models"),
                                           "output_dir": str(out / "eval"), "dist_dump_dir": str(out / "dump")}, out)
        runs[nproc] = (out, load_dumps(out / "dump", nproc), seconds)

    two, one = runs[2][1], runs[1][1][0]
    assert two[0]["iteration"] == one["iteration"] == 3  # 6 training volumes / global batch 2
    assert_ranks_identical(two)
    for net in nets:
        a, b = two[0]["state_dict"][net], one["state_dict"][net]
        assert list(a) == list(b)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{bundle} {net}.{key}: {m}")

    # rank 0 wrote the same set of files one process writes, with unprefixed checkpoint keys
    out2, out1 = runs[2][0], runs[1][0]
    assert sorted(p.name for p in (out2 / "models").iterdir()) == sorted(p.name for p in (out1 / "models").iterdir())
    assert {"last.pt", "model.pt"} <= {p.name for p in (out2 / "models").iterdir()}
    state = torch.load(out2 / "models" / "last.pt", weights_only=True)
    assert_plain_checkpoint(out2 / "models" / "last.pt", [k for k in ("network", "gnetwork", "dnetwork") if k in state])
    assert state["trainer"]["iteration"] == 3
    # every optimizer took 3 steps with non-zero gradients, so equal weights are not just equal initial weights
    optimizers = [v for k, v in state.items() if k.endswith("optimizer")]
    assert optimizers and all(
        s["step"] == 3 for opt in optimizers for s in opt["state"].values()
    ) and all(any(s["exp_avg"].abs().sum() > 0 for s in opt["state"].values()) for opt in optimizers)
    assert events_files(out2 / "eval") == events_files(out1 / "eval")
    print(f"{bundle}: 2 processes {runs[2][2]:.1f} s, 1 process {runs[1][2]:.1f} s")


def test_gan_ranks_stay_identical_and_resume(tiny_dataset, tmp_path):
    """brain_generalization (cgan): per-rank latents and random slices, BatchNorm G and D; then resume."""
    bundle = "brain_generalization"
    common = {**BRAIN_TINY, "dataset_dir": str(tiny_dataset), "ckpt_dir": str(tmp_path / "models"),
              "output_dir": str(tmp_path / "eval"), "volumes_per_batch": 1, "time_limit_s": 3600}
    torchrun(bundle, 2, {**common, "epochs": 1, "dist_dump_dir": str(tmp_path / "dump1")}, tmp_path)
    first = load_dumps(tmp_path / "dump1", 2)
    assert first[0]["iteration"] == 3  # 6 volumes over 2 ranks x 1 per batch
    assert_ranks_identical(first)
    assert any(k.endswith(BN_STATS) for k in first[0]["state_dict"]["dnetwork"])  # what the comparison leaves out
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["last.pt", "model.pt"]
    state = assert_plain_checkpoint(tmp_path / "models" / "last.pt", ["gnetwork", "dnetwork"])
    assert state["trainer"]["iteration"] == state["trainer"]["epoch_length"] == 3  # end of epoch 1
    files = events_files(tmp_path / "eval")
    assert files == {".": 2, "train_img": 1}  # train + validation scalars, generated grid: rank 0 only

    # the checkpoint of the DDP run loads into the plain networks of a single-process run
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / bundle / "configs" / "train.json"))
    parser.update({k: v for k, v in BRAIN_TINY.items() if k in ("image_size", "g_channels", "d_channels")})
    parser.get_parsed_content("gnetwork_def").load_state_dict(state["gnetwork"])
    parser.get_parsed_content("dnetwork_def").load_state_dict(state["dnetwork"])

    # resume: every rank restores rank 0's last.pt and trains epoch 2 only
    torchrun(bundle, 2, {**common, "epochs": 2, "dist_dump_dir": str(tmp_path / "dump2")}, tmp_path / "resume")
    second = load_dumps(tmp_path / "dump2", 2)
    assert second[0]["iteration"] == 6
    assert_ranks_identical(second)
    state = torch.load(tmp_path / "models" / "last.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 6  # end of epoch 2
    moved = [k for k, v in first[0]["state_dict"]["gnetwork"].items() if not k.endswith(BN_STATS) and v.is_floating_point()
             and not torch.equal(v, second[0]["state_dict"]["gnetwork"][k])]
    assert moved, "epoch 2 did not change the generator"
