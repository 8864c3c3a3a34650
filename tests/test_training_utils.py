"""common/schedules.py (training clock, cosine lr), common/metrics.py (edit distance) and common/checkpoint.py
(checkpoints that appear only once complete)."""
from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.metrics import error_rate, levenshtein  # noqa: E402
from common.first_pass import BoundaryDrift  # noqa: E402
from common.schedules import TrainClock, aligned_stop, batch_lr, cosine_lr, run_progress  # noqa: E402


def test_cosine_lr_endpoints_and_monotone():
    assert cosine_lr(0.003, 0.0, 0.05) == pytest.approx(0.003)
    assert cosine_lr(0.003, 1.0, 0.05) == pytest.approx(0.00015)
    assert cosine_lr(0.003, 0.5, 0.05) == pytest.approx((0.003 + 0.00015) / 2)
    vals = [cosine_lr(1.0, p / 20, 0.1) for p in range(21)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    assert cosine_lr(1.0, 1.7, 0.1) == pytest.approx(0.1) and cosine_lr(1.0, -1, 0.1) == pytest.approx(1.0)


def test_warmup_ramps_newbob_and_spares_the_overfit_check():
    from types import SimpleNamespace

    hp = SimpleNamespace(lr=0.003, lr_schedule="newbob", lr_final_ratio=0.05, warmup_steps=100, max_train_minutes=0,
                         epoch_counter=SimpleNamespace(limit=10), overfit_one_batch=False)
    clock = TrainClock()
    # linear ramp of NewBob's rate over the first 100 optimizer steps, then NewBob's own (None: left as it is)
    assert batch_lr(hp, clock, 1, 0, 148, 0, 0.003) == pytest.approx(0.003 / 100)
    assert batch_lr(hp, clock, 1, 49, 148, 49, 0.003) == pytest.approx(0.0015)
    assert batch_lr(hp, clock, 1, 99, 148, 99, 0.002) == pytest.approx(0.002)
    assert batch_lr(hp, clock, 1, 120, 148, 120, 0.003) is None
    hp.overfit_one_batch = True  # the sanity check trains at the full rate from its first step
    assert batch_lr(hp, clock, 1, 0, 10, 0, 0.003) is None
    hp.overfit_one_batch, hp.warmup_steps = False, 0
    assert batch_lr(hp, clock, 1, 0, 148, 0, 0.003) is None


def test_run_progress_takes_the_tighter_limit():
    # epoch 3 of 10, half way through it: 25 %; the time budget is half spent: 50 % wins
    assert run_progress(3, 50, 100, 10, 0.0, 0.0) == pytest.approx(0.25)
    assert run_progress(3, 50, 100, 10, 450.0, 900.0) == pytest.approx(0.5)
    assert run_progress(1, 0, 0, 10, 10.0, 0.0) == 0.0
    assert run_progress(12, 0, 10, 10, 0.0, 0.0) == 1.0


def test_train_clock_survives_save_and_load(tmp_path):
    c = TrainClock()
    c.before = 100.0
    time.sleep(0.05)
    c._save(tmp_path / "clock.ckpt")
    d = TrainClock()
    d._load(tmp_path / "clock.ckpt")
    assert 100.04 < d.elapsed() < 101.0


def _slow_levenshtein(a, b):
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def test_levenshtein_matches_textbook_dp():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randint(0, 4) for _ in range(rng.randint(0, 15))]
        b = [rng.randint(0, 4) for _ in range(rng.randint(0, 15))]
        assert levenshtein(a, b) == _slow_levenshtein(a, b), (a, b)
    assert levenshtein([1, 2, 3], [1, 2, 3]) == 0 and levenshtein([], [4, 5]) == 2
    assert error_rate([1, 2, 3, 4], [1, 3, 4, 9]) == pytest.approx(50.0)


def test_interrupted_save_is_invisible_and_cleaned(tmp_path):
    from common.checkpoint import AtomicCheckpointer

    class Boom(torch.nn.Module):  # its saver dies half way, like a SIGKILL during a save
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))
            self.fail = False

    model, other = torch.nn.Linear(2, 2), Boom()

    def save_other(obj, path):
        if obj.fail:
            Path(path).write_bytes(b"PK\x03")  # a truncated file
            raise KeyboardInterrupt
        torch.save(obj.state_dict(), path)

    ck = AtomicCheckpointer(tmp_path / "save", recoverables={"model": model})
    ck.add_recoverable("other", other, custom_save_hook=save_other,
                       custom_load_hook=lambda obj, path, end: obj.load_state_dict(torch.load(path)))
    good = ck.save_checkpoint(meta={"PER": 50.0})
    assert (good.path / "CKPT.yaml").is_file() and not list(good.path.glob(".*pending"))
    other.fail = True
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(meta={"PER": 10.0})
    assert [c.path for c in ck.list_checkpoints()] == [good.path]  # the broken one is not a checkpoint
    assert ck.recover_if_possible().path == good.path
    removed = ck.remove_incomplete()
    assert len(removed) == 1 and not removed[0].exists() and good.path.exists()


def _ddp_checkpoint_worker(rank: int, rendezvous: str, save_dir: str) -> None:
    """One of two gloo processes saving checkpoints the way the recipe does (save_and_keep_only each epoch)."""
    import datetime
    import os

    from common.checkpoint import AtomicCheckpointer

    os.environ["RANK"] = str(rank)
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=30))
    if rank == 0:  # a slow file system: rank 0 publishes each checkpoint late
        real_replace = os.replace

        def slow_replace(src, dst):
            time.sleep(0.5)
            real_replace(src, dst)

        os.replace = slow_replace
    ck = AtomicCheckpointer(save_dir, recoverables={"model": torch.nn.Linear(2, 2)})
    for epoch in range(3):
        ck.save_and_keep_only(meta={"PER": 10.0 - epoch, "epoch": epoch}, min_keys=["PER"], num_to_keep=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ddp_checkpoint_rotation_does_not_deadlock(tmp_path):
    # Before the fix, rank 1 could list the checkpoints before rank 0 had published the new one, choose a different
    # set to delete, and wait in a barrier while rank 0 waited in a broadcast (the DDP test hung once in 5 runs).
    import torch.multiprocessing as mp

    from common.checkpoint import AtomicCheckpointer

    mp.spawn(_ddp_checkpoint_worker, args=(str(tmp_path / "rdv"), str(tmp_path / "save")), nprocs=2, join=True)
    ckpts = AtomicCheckpointer(tmp_path / "save").list_checkpoints()
    assert [c.meta["epoch"] for c in ckpts] == [2]  # rotated down to the best (and latest) one


def test_cuda_batches_follow_gpu_memory_and_scale_lr():
    from common.batching import cuda_batch_seconds, device_overrides

    hp = {"dynamic_batching": True, "max_batch_length": 6.0, "max_batch_length_cuda": 0.0, "lr": 0.003,
          "cuda_batch_seconds_per_gb": 4.0, "cuda_max_batch_length": 400.0, "min_batches_per_epoch": 50,
          "lr_batch_scaling": "sqrt"}
    assert device_overrides(hp, "cpu", {}, 36000.0) == {}  # CPU keeps the yaml's batch
    assert cuda_batch_seconds(hp, 80.0, 36000.0) == 320.0  # 80 GB x 4 s, 10 h of audio: 112 steps per epoch
    assert cuda_batch_seconds(hp, 140.0, 36000.0) == 400.0  # capped
    assert cuda_batch_seconds(hp, 80.0, 600.0) == 12.0  # a 10-minute corpus still gets 50 steps per epoch
    assert cuda_batch_seconds(hp, 80.0, 100.0) == 6.0  # never below the CPU batch
    ov = device_overrides(hp, "cuda:0", {}, 36000.0, gpu_memory_gb=80.0)
    assert ov["max_batch_length"] == 320.0 and ov["lr"] == pytest.approx(0.003 * (320 / 6) ** 0.5)
    assert device_overrides(hp, "cuda:0", {"lr": 0.01}, 36000.0, gpu_memory_gb=80.0) == {"max_batch_length": 320.0}
    assert device_overrides(hp, "cuda:0", {"max_batch_length": 30}, 36000.0, gpu_memory_gb=80.0) == {}
    assert device_overrides({**hp, "lr_batch_scaling": "linear"}, "cuda", {}, 36000.0, 80.0)["lr"] == \
        pytest.approx(0.003 * 320 / 6)
    assert device_overrides({**hp, "max_batch_length_cuda": 90.0}, "cuda", {}, 36000.0, 80.0)["max_batch_length"] == 90


def test_boundary_drift_and_the_stop_rule():
    d = BoundaryDrift()
    d.start()
    d.add("a", [2, 3, 5], 0.01)   # ends 20, 50, 100 ms
    d.add("b", [4, 4], 0.01)
    assert d.finish() is None      # nothing to compare with yet
    d.start()
    d.add("a", [3, 2, 5], 0.01)   # ends 30, 50, 100: moved 10, 0, 0 -> 3.333 ms
    d.add("b", [4, 4, 1], 0.01)   # another token count (not comparable): left out
    d.add("c", [1], 0.01)          # new row: left out
    assert d.finish() == pytest.approx(10 / 3, abs=1e-3)

    class H:
        stop_align_shift_ms, stop_align_patience, stop_align_min_epochs, stop_align_max_per = 5.0, 2, 3, 95.0

    hist = [{"align_shift_ms": s, "PER": 80.0} for s in (None, 4.0, 3.0)]
    assert aligned_stop(hist, H, epoch=3)
    assert not aligned_stop(hist, H, epoch=2)                                   # before min epochs
    assert not aligned_stop(hist[:2] + [{"align_shift_ms": 6.0, "PER": 80.0}], H, epoch=3)  # the last moved more
    assert not aligned_stop(hist[:2] + [{"align_shift_ms": 1.0, "PER": 100.0}], H, epoch=3)  # still all blanks
    assert not aligned_stop([{"align_shift_ms": None, "PER": 50.0}, {"align_shift_ms": 1.0, "PER": 50.0}], H,
                            epoch=5)                                            # resumed: no shift yet
    H.stop_align_shift_ms = 0.0
    assert not aligned_stop(hist, H, epoch=3)                                   # off


def test_ctc_blank_prior_starts_the_ctc_head_on_blank(tmp_path):
    """yaml ``ctc_blank_prior``: the CTC output layer starts with blank at that probability; 0 leaves the init."""
    from hyperpyyaml import load_hyperpyyaml

    from common.io import UserError
    from common.model import blank_prior

    def head(prior, seed=7):
        text = (ROOT / "hparams/phoneme.yaml").read_text()
        hp = load_hyperpyyaml(text, {"data_folder": str(tmp_path), "output_folder": str(tmp_path / "out"),
                                     "output_neurons": 44, "seed": seed, "ctc_blank_prior": prior})
        return hp["ctc_lin"], hp["blank_index"]

    enc = torch.randn(4, 50, 256) * 0.1  # an untrained encoder's small outputs
    (off, blank), (on, _) = head(0.0), head(0.8)
    with torch.no_grad():
        p_off = float(torch.softmax(off(enc), -1)[..., blank].mean())
        p_on = float(torch.softmax(on(enc), -1)[..., blank].mean())
    assert p_off < 0.1 and p_on == pytest.approx(0.8, abs=0.03), (p_off, p_on)
    # only the blank bias moves; every other weight is the same random init
    assert torch.equal(off.w.weight, on.w.weight)
    shift = (on.w.bias - off.w.bias).detach()
    assert shift.nonzero().flatten().tolist() == [blank] and float(shift[blank]) == pytest.approx(math.log(43 * 4))
    with pytest.raises(UserError, match="ctc_blank_prior=1.0"):
        blank_prior(off, blank, 1.0)
