"""Multi-process training on CPU (gloo, 2 processes): the rank-averaged gradient is the one-process
gradient of the whole batch for every loss type (DDP and FSDP2, logits and fused-linear loss, LoRA);
a 2-rank ReRULE run under torchrun keeps the ranks' parameters equal and round-trips each rank's
buffer shard; an FSDP run through ``accelerate launch`` and the CLI; resume with another world size is
refused; a rank killed while writing a checkpoint leaves the previous complete one, which resumes.

Rank processes are forked from the test process (fast: the imports are already done) or launched
with torchrun / accelerate; this file is also the script those launchers run
(``python tests/train/test_distributed.py ddp|cli OUT``). Every launch has a timeout and a free port.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from tests.train._toy import toy_task, upper_reward

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
STEPS = 3
TIME_KEYS = {"time_rollout_s", "time_update_s", "time_step_s", "time_total_s"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world, port, args, err):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    code = 0
    try:
        from accelerate.state import AcceleratorState

        # A forked child must not inherit a single-process accelerate state from the test process.
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.set_num_threads(1)
        fn(rank, *args)
    except BaseException:
        Path(err).write_text(traceback.format_exc())
        code = 1
    os._exit(code)


def _fork_ranks(fn, args, tmp: Path, timeout: float = 120, world: int = 2, expect_ok: bool = True):
    """Run ``fn(rank, *args)`` in ``world`` forked processes that join one gloo group. Returns exit codes."""
    ctx, port = mp.get_context("fork"), _free_port()
    errs = [tmp / f"err-{os.getpid()}-{port}-{r}.txt" for r in range(world)]
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, str(errs[r]))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    if expect_ok and codes != [0] * world:
        pytest.fail(f"ranks exited {codes}:\n" + "\n".join(e.read_text() for e in errs if e.exists()))
    return codes


# -- the gradient: DDP / FSDP average over 2 ranks == 1 rank on the whole batch ----------------------

G, MICRO, CAP, LAM = 4, 4, 1.5, 0.7
FRESH_SPLIT = ((0, 8), (8, 16))
# replayed rows per rank: unequal (4 vs 8), or one rank without any
REPLAY_SPLIT = {"grpo": ((0, 4), (4, 12)), "bnpo": ((0, 0), (0, 12)), "dr_grpo": ((0, 4), (4, 12)),
                "dapo": ((0, 0), (0, 12))}
CASES = [("ddp", "logits", lt, False) for lt in REPLAY_SPLIT]
CASES += [("ddp", "fused_linear", lt, False) for lt in REPLAY_SPLIT]
CASES += [("fsdp", "logits", lt, False) for lt in REPLAY_SPLIT]
CASES += [("ddp", "logits", "grpo", True), ("fsdp", "logits", "dapo", True)]


def _case_id(case) -> str:
    return "-".join([case[0], case[1], case[2]] + (["lora"] if case[3] else []))


def _tiny(lora: bool):
    from rerule.train.model import build_char_tokenizer, build_tiny_llama

    tok = build_char_tokenizer()
    model = build_tiny_llama(len(tok), seed=2, tokenizer=tok)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(5)
        # init_lora_weights=False: B is random too, so A gets a gradient as well
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    return model, len(tok)


def _set(V, B, T, seed, behavior):
    from rerule.loss import group_advantages
    from rerule.train.rollout import SeqBatch
    from rerule.train.update import UpdateSet

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    cmask = (torch.arange(T)[None] < lengths[:, None]).long()
    p_ids = torch.randint(3, V, (B, 3), generator=g)
    p_mask = torch.ones(B, 3, dtype=torch.long)
    p_mask[::3, 0] = 0
    rewards = torch.randint(0, 3, (B,), generator=g).float() / 2
    beh = -torch.rand(B, T, generator=g) * 3 if behavior else None
    ref = -torch.rand(B, T, generator=g) * 3
    return UpdateSet(SeqBatch(p_ids, p_mask, ids, cmask), group_advantages(rewards, G), rewards, beh, ref, G)


def _sets(V):
    return _set(V, 16, 6, seed=13, behavior=False), _set(V, 12, 5, seed=12, behavior=True)


def _rows(s, a: int, b: int):
    from rerule.train.update import UpdateSet

    if a == b:
        return None
    cut = lambda t: None if t is None else t[a:b]  # noqa: E731
    return UpdateSet(s.batch.rows(a, b, trim=False), s.advantages[a:b], s.rewards[a:b], cut(s.behavior),
                     cut(s.ref), s.group_size, s.sources[a:b])


def _loss_kw(loss_type):
    kw = dict(temperature=1.0, epsilon_low=0.2, epsilon_high=0.3, dual_clip=3.0, beta=0.04, loss_type=loss_type,
              importance_sampling_level="token")
    return dict(kw, max_completion_length=8) if loss_type == "dr_grpo" else kw


STAT_KEYS = ("loss_on", "loss_replay", "train_tokens", "kl", "replay_kl", "is_weight_mean", "is_ess")


def _grad_ranks(rank, out):
    from rerule.train import distributed
    from rerule.train.config import DistributedConfig
    from rerule.train.update import PolicyUpdate

    for case in CASES:
        strategy, impl, loss_type, lora = case
        dist = distributed.setup(DistributedConfig(strategy=strategy), "cpu")
        model, V = _tiny(lora)
        model = dist.shard(model)
        forward = dist.wrap(model, hidden=impl == "fused_linear")
        fresh, rep = _sets(V)
        update = PolicyUpdate(model, _loss_kw(loss_type), impl, "torch", None, MICRO, CAP, LAM, "consistent",
                              dist, forward)
        model.zero_grad(set_to_none=True)
        _, stats = update(_rows(fresh, *FRESH_SPLIT[rank]), _rows(rep, *REPLAY_SPLIT[loss_type][rank]))
        grads = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                grads[n] = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
        if rank == 0:
            torch.save({"grads": grads, "stats": {k: stats.get(k) for k in STAT_KEYS}}, out / f"{_case_id(case)}.pt")


@pytest.fixture(scope="module")
def rank_grads(tmp_path_factory):
    out = tmp_path_factory.mktemp("grads")
    _fork_ranks(_grad_ranks, (out,), out, timeout=180)
    return out


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_rank_averaged_gradient_is_the_whole_batch_gradient(case, rank_grads):
    from rerule.train.update import PolicyUpdate

    strategy, impl, loss_type, lora = case
    model, V = _tiny(lora)
    fresh, rep = _sets(V)
    # The split is uneven in tokens (and replayed rows), so a per-rank normalizer would be wrong.
    (a0, b0), (a1, b1) = FRESH_SPLIT
    assert fresh.batch.completion_mask[a0:b0].sum() != fresh.batch.completion_mask[a1:b1].sum()
    update = PolicyUpdate(model, _loss_kw(loss_type), impl, "torch", None, MICRO, CAP, LAM)
    model.zero_grad(set_to_none=True)
    _, stats = update(fresh, rep)
    got = torch.load(rank_grads / f"{_case_id(case)}.pt", weights_only=True)
    want = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(got["grads"]) == set(want) and len(want) > 0
    assert sum(float(g.abs().sum()) for g in want.values()) > 0
    for n, g in want.items():
        torch.testing.assert_close(got["grads"][n], g, atol=2e-6, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    for k in STAT_KEYS:
        assert got["stats"][k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), k


# -- a 2-rank ReRULE run (torchrun) and an FSDP run through accelerate + the CLI ---------------------


def _config(out, steps=STEPS, **extra):
    from rerule.train.config import TrainConfig

    d = {"steps": steps, "seed": 3, "output_dir": str(out), "progress": False, "save_final": False,
         "device": "cpu", "tensorboard": "off", "save_every": 1, "keep_checkpoints": 3,
         "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 4},
         "optim": {"lr": 1e-2, "micro_batch_groups": 1}, "loss": {"beta": 0.05, "loss_type": "dapo"},
         "warm_start": {"epochs": 1, "lr": 1e-2, "batch_size": 4, "warmup_steps": 0},
         "replay": {"enabled": True, "start_step": 1, "fraction": 0.5, "cap": 1.5},
         "sampling": {"mode": "prioritized"}, "distributed": {"timeout_s": 60}}
    return TrainConfig.from_dict(d).apply_overrides(extra)


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _drive_ddp(out: Path) -> None:
    """Under torchrun: train, checking after every step that all ranks hold bitwise equal parameters;
    then resume from the final checkpoint and compare this rank's buffer, sampler and RNG."""
    from rerule.train.trainer import Trainer

    tr = Trainer(_config(out), task=toy_task(), reward_fn=upper_reward)
    assert tr.dist.world_size == 2 and tr.dist.strategy == "ddp"
    checked = []

    def agree(m):
        for p in tr.model.parameters():
            t = p.detach().clone()
            torch.distributed.broadcast(t, src=0)
            assert torch.equal(t, p.detach()), "parameters differ across ranks"
        checked.append(m["step"])

    tr.train(callback=agree)
    back = Trainer(_config(out), task=toy_task(), reward_fn=upper_reward, resume=True)
    assert back.step == STEPS and len(back.buffer) == len(tr.buffer) > 0
    _assert_same(back.buffer.state_dict(), tr.buffer.state_dict(), "buffer")
    _assert_same(back.sampler.state_dict(), tr.sampler.state_dict(), "sampler")
    _assert_same(back._rng, tr._rng, "rng")
    _assert_same(back.optimizer.state_dict(), tr.optimizer.state_dict(), "optimizer")
    _assert_same(dict(back.model.named_parameters()), dict(tr.model.named_parameters()), "model")
    rank = tr.dist.rank
    diff = sorted({k for a, b in zip(back.history, tr.history) for k in a if a[k] != b.get(k)})
    (out / f"ok-rank{rank}.json").write_text(json.dumps({"checked": checked, "history_diff": diff}))


def _launch(cmd: list[str], timeout: float = 300) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


def test_two_rank_rerule_run_agrees_round_trips_and_refuses_other_world_size(tmp_path):
    out = tmp_path / "ddp"
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(_free_port()), str(HERE), "ddp", str(out)])
    for r in (0, 1):
        ok = json.loads((out / f"ok-rank{r}.json").read_text())
        assert ok["checked"] == list(range(1, STEPS + 1))
        # the history saved by rank 0 holds global metrics: only wall times are rank-local
        assert set(ok["history_diff"]) <= (TIME_KEYS if r else set())
    final = out / "checkpoints" / f"step-{STEPS:06d}"
    state = torch.load(final / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and "buffer" not in state
    shards = [torch.load(final / f"buffer-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [s["rank"] for s in shards] == [0, 1]
    # each rank sampled its own prompts (own seed) and kept its own buffer
    assert not torch.equal(shards[0]["sampler"]["generator"], shards[1]["sampler"]["generator"])
    groups = [[(e["key"], e["step"]) for e in s["buffer"]["entries"]] for s in shards]
    assert all(groups) and groups[0] != groups[1]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))  # rank 0 logs, once
    assert rows[-1]["buffer_size"] == sum(len(s["buffer"]["entries"]) for s in shards)
    assert rows[-1]["generated_tokens"] <= 2 * 4 * 4 * 4 and rows[-1]["replay_groups"] >= 1

    from rerule.train.trainer import Trainer

    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1.*same world size"):
        Trainer(_config(out), task=toy_task(), reward_fn=upper_reward, resume=True)


CLI_OVERRIDES = ["--steps", "2", "--save_every", "1", "--progress", "false",
                 "--rollout.group_size", "4", "--rollout.prompts_per_step", "4", "--rollout.max_new_tokens", "6",
                 "--warm_start.epochs", "1", "--warm_start.lr", "1e-2", "--replay.start_step", "1",
                 "--replay.fraction", "0.5", "--distributed.timeout_s", "60"]


def _drive_cli(out: Path) -> None:
    """Under accelerate launch (FSDP config): ``rerule train`` as a user runs it, then a resume in the same
    processes whose gathered weights, optimizer and shard equal the checkpoint's."""
    from rerule import cli
    from rerule.train.checkpoint import latest_checkpoint, load_checkpoint
    from rerule.train.config import TrainConfig
    from rerule.train.trainer import Trainer

    args = ["--output_dir", str(out)] + CLI_OVERRIDES
    assert cli.main(["train", "--config", "rerule/configs/tiny_synthetic.yaml"] + args) == 0
    overrides = cli.parse_overrides(args)
    tr = Trainer(TrainConfig.from_yaml("rerule/configs/tiny_synthetic.yaml", overrides), resume=True)
    assert tr.dist.strategy == "fsdp" and type(next(tr.model.parameters())).__name__ == "DTensor"
    path = latest_checkpoint(out / "checkpoints")
    saved = load_checkpoint(path)
    model, optim = tr.dist.model_state(tr.model), tr.dist.optimizer_state(tr.model, tr.optimizer)
    if tr.dist.is_main:
        _assert_same(model, saved["model"], "model")
        _assert_same(optim, saved["optimizer"], "optimizer")
    _assert_same(tr.buffer.state_dict(), tr.dist.load_shard(path)["buffer"], "buffer")
    (out / f"ok-rank{tr.dist.rank}").write_text(str(tr.step))


def test_fsdp_cli_under_accelerate_launch(tmp_path):
    out = tmp_path / "fsdp"
    accelerate = Path(sys.executable).parent / "accelerate"
    _launch([str(accelerate), "launch", "--config_file", "rerule/configs/accelerate_fsdp.yaml", "--num_processes",
             "2", "--main_process_port", str(_free_port()), str(HERE), "cli", str(out)])
    assert [(out / f"ok-rank{r}").read_text() for r in (0, 1)] == ["2", "2"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    # The sharded reference is the warm-started policy: it moved away from the initial weights, and
    # the first step's KL against it is zero.
    from rerule.train.config import TrainConfig
    from rerule.train.model import load_model

    initial = load_model(TrainConfig.from_yaml("rerule/configs/tiny_synthetic.yaml").model, torch.device("cpu"))[0]
    reference = torch.load(out / "reference.pt", weights_only=True)
    assert any(not torch.equal(v, reference[k]) for k, v in initial.state_dict().items())
    assert rows[0]["kl"] < 1e-7
    state = torch.load(out / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    assert (state["world_size"], state["strategy"]) == (2, "fsdp")
    assert (out / "final" / "config.json").is_file() and list((out / "final").glob("*.safetensors"))


# -- a rank dying mid-checkpoint ---------------------------------------------------------------------


def _die_while_saving(rank, out):
    """Rank 1 tears its shard file of checkpoint 2 in half and is SIGKILLed."""
    from rerule.train import checkpoint as ckpt
    from rerule.train.trainer import Trainer

    if rank == 1:
        save = ckpt.atomic_save

        def torn(obj, path):
            path = Path(path)
            if path.name == "buffer-rank1.pt" and path.parent.name.startswith("step-000002.tmp-"):
                path.write_bytes(b"half a shard")
                os.kill(os.getpid(), signal.SIGKILL)
            save(obj, path)

        ckpt.atomic_save = torn
    Trainer(_config(out), task=toy_task(), reward_fn=upper_reward).train()


def _resume(rank, out):
    from rerule.train.trainer import Trainer

    tr = Trainer(_config(out), task=toy_task(), reward_fn=upper_reward, resume=True)
    assert tr.step == 1
    tr.train()


def test_rank_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    from rerule.train.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

    out = tmp_path / "kill"
    # rank 0 is blocked in the barrier (or fails in it) once rank 1 is gone: the launcher would stop
    # it; here the timeout does
    codes = _fork_ranks(_die_while_saving, (out,), tmp_path, timeout=60, expect_ok=False)
    assert codes[1] == -signal.SIGKILL and codes[0] != 0, codes
    root = out / "checkpoints"
    assert list_checkpoints(root) == [1] and latest_checkpoint(root).name == "step-000001"
    assert [p.name for p in root.glob("step-000002*")][0].startswith("step-000002.tmp-")
    assert load_checkpoint(latest_checkpoint(root))["state"]["step"] == 1
    assert all((root / "step-000001" / f"buffer-rank{r}.pt").is_file() for r in (0, 1))

    _fork_ranks(_resume, (out,), tmp_path, timeout=120)
    assert list_checkpoints(root)[-1] == STEPS and not list(root.glob("*.tmp-*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))


def _save_and_load_training(rank, out):
    """Checkpoint collectives on plain values: a model, an optimizer and a state dict (no trainer)."""
    from rerule.train import checkpoint as ckpt
    from rerule.train import distributed
    from rerule.train.config import DistributedConfig

    d = distributed.setup(DistributedConfig(), "cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {"step": 5, "buffer": {"rank": rank}, "sampler": [rank], "rng": None, "history": []}
    path = d.save_training(model, opt, state, out / "checkpoints", 5, keep=2)
    assert "buffer" in state and d.check_resume(path if d.is_main else None) == path
    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    parts = ckpt.load_checkpoint(path, map_location="cpu")
    assert parts["state"]["world_size"] == 2 and "buffer" not in parts["state"]
    d.load_training(fresh, fresh_opt, path, parts)
    assert parts["state"]["buffer"] == {"rank": rank} and parts["state"]["sampler"] == [rank]
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_save_and_load_training_take_plain_values(tmp_path):
    _fork_ranks(_save_and_load_training, (tmp_path / "plain",), tmp_path, timeout=60)
    assert sorted(p.name for p in (tmp_path / "plain" / "checkpoints" / "step-000005").glob("buffer-rank*.pt")) == [
        "buffer-rank0.pt", "buffer-rank1.pt"]


def test_single_process_dist_is_the_identity(monkeypatch):
    from rerule.train import distributed
    from rerule.train.config import DistributedConfig

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = distributed.setup(DistributedConfig(), "cpu")
    assert (d.enabled, d.is_main, d.strategy, d.seed(7)) == (False, True, "none", 7)
    assert d.all_sum([1, 2.5]) == [1.0, 2.5] and d.gather("x") == ["x"] and d.broadcast(3) == 3
    assert d.per_rank_totals([8, 4], [30.0, 9.0]) == ([8.0, 4.0], [30.0, 9.0])
    assert d.wrap(torch.nn.Linear(2, 2), hidden=False) is None and d.micro_steps(3) == 3
    assert distributed.Dist(world_size=4, rank=2).seed(7) == 7 + 2 * distributed.RANK_SEED_STRIDE


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"ddp": _drive_ddp, "cli": _drive_cli}[sys.argv[1]](Path(sys.argv[2]))
