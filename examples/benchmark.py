"""Benchmark NetTailor's training step and its pruned networks, side by side with plain fine-tuning.

Measures, on one machine with one backbone, batch and input size (random inputs, ``pretrained=False``):

* train step: plain full fine-tuning (``TeacherObjective``: forward, backward, SGD) and the
  ``tailor`` step (``StudentObjective``: teacher under inference_mode, student forward/backward
  with the default loss weights and ``--train-bn`` setting, SGD), exactly as ``train.fit`` runs them;
* peak memory of each step, each in a fresh subprocess (CPU: peak RSS growth over the
  interpreter's baseline; CUDA: ``torch.cuda.max_memory_allocated``). Both include the
  models, optimizer state and the step's activations;
* inference images/s of the full fine-tuned timm network and of a pruned student
  (``--drop-blocks`` universal blocks removed, a few proxies kept), at batch 1 and batch B,
  against the ratio of their MACs.

Timings are medians over ``--repeats`` after ``--warmup``; the two sides of every comparison
are interleaved (A B, then B A, ...) so that a noisy machine disturbs both alike.

    python examples/benchmark.py                                   # resnet34, batch 64, 64 px, CPU
    python examples/benchmark.py --backbone resnet18 --json
    python examples/benchmark.py --device cuda --amp --channels-last [--compile]
    OMP_WAIT_POLICY=PASSIVE python examples/benchmark.py   # a CPU shared with other busy processes
                                                           # (on an idle CPU it slows small ops down)

Targets (issue 5): tailor step <= 1.1x the fine-tuning step; peak memory <= 1.25x; pruned
inference speed-up >= 0.8x the MAC ratio, at batch 1 and batch B.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = {"train_step_ratio": 1.1, "memory_ratio": 1.25, "inference_efficiency": 0.8}
NUM_CLASSES = 10


# --------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet34", help="timm ResNet (built with pretrained=False)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for training and inference")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training forwards of both steps, as the CLI's --compile does")
    p.add_argument("--drop-blocks", type=int, default=None,
                   help="universal blocks the pruned student drops (default: half of them)")
    p.add_argument("--batch1-iters", type=int, default=10,
                   help="forward passes per timed repeat at batch 1 (per-image time is their mean)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory (one fresh subprocess per step kind)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print exactly one JSON document on stdout")
    p.add_argument("--_memory-child", dest="memory_child", choices=("finetune", "tailor"), default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.batch1_iters < 1:
        p.error("--repeats, --batch-size and --batch1-iters must be >= 1, --warmup >= 0")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- set-up
class Setup:
    """Everything both sides need, built exactly as the pipeline builds it."""

    def __init__(self, args: argparse.Namespace, *, need: tuple[str, ...] = ("finetune", "tailor", "pruned")):
        import timm

        from tailor_cli import defaults
        from tailor_cli.backbone import describe_chain
        from tailor_cli.counting import path_costs
        from tailor_cli.losses import ComplexityModel
        from tailor_cli.objectives import StudentObjective, TeacherObjective
        from tailor_cli.student import Student
        from tailor_cli.train import TrainConfig, make_optimizer

        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(args.seed)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        B, S = args.batch_size, args.img_size
        self.images = torch.randn(B, 3, S, S, device=self.device).contiguous(memory_format=self.memory_format)
        self.labels = torch.randint(0, NUM_CLASSES, (B,), device=self.device)
        self.image1 = self.images[:1].clone().contiguous(memory_format=self.memory_format)

        def new_model():
            return timm.create_model(args.backbone, pretrained=False, num_classes=NUM_CLASSES)

        def prepare(m):
            return m.to(self.device, memory_format=self.memory_format)

        cfg = TrainConfig(epochs=1, lr=0.01, lr_step=1)
        if "finetune" in need or "full_infer" in need:
            self.full = prepare(new_model())  # the fine-tuned network (and the inference baseline)
        compile_ = torch.compile if args.compile else (lambda m: m)
        if "finetune" in need:
            self.ft_objective = TeacherObjective(self.full, compile_(self.full))
            self.ft_opt, _ = make_optimizer([{"params": list(self.full.parameters())}], cfg)
        if "tailor" in need:
            self.teacher = prepare(new_model()).eval().requires_grad_(False)
            self.student = Student(new_model(), NUM_CLASSES, train_bn=defaults.TRAIN_BN)
            costs, _ = path_costs(self.student, S)  # on CPU, at the training size, as the pipeline does
            self.student = prepare(self.student)
            complexity = ComplexityModel(self.student.structure, costs).to(self.device)
            self.tailor_objective = StudentObjective(self.student, self.teacher, describe_chain(self.teacher),
                                                     complexity, defaults.COMPLEXITY_WEIGHT, defaults.TEACHER_WEIGHT,
                                                     forward=compile_(self.student))
            logits = {id(p) for p in self.student.attention_parameters()}  # stages.common._student_groups
            rest = [p for p in self.student.trainable_parameters() if id(p) not in logits]
            groups = [{"params": rest}, {"params": self.student.attention_parameters(), "weight_decay": 0.0}]
            self.tailor_opt, _ = make_optimizer(groups, TrainConfig(epochs=1, lr=0.1, lr_step=1))
        if "pruned" in need:
            student = Student(new_model(), NUM_CLASSES)
            self.full_student_macs = _student_total_macs(student, S)
            self.drop_blocks, structure = pruned_structure(student, args.drop_blocks)
            student.prune_(structure)
            self.pruned = prepare(student).eval()
            self.pruned_macs = _student_total_macs(self.pruned, S)

        self.amp_ctx = contextlib.nullcontext
        if args.amp:
            def amp_ctx():
                return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            self.amp_ctx = amp_ctx

    # one step, as train.fit runs it
    def _step(self, objective, opt) -> None:
        with self.amp_ctx():
            loss, _, _ = objective(self.images, self.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @contextlib.contextmanager
    def eager(self):
        """The objectives run their plain forwards (no ``--compile``): for ``FlopCounterMode``."""
        saved = [(self.ft_objective, self.ft_objective.forward, self.full),
                 (self.tailor_objective, self.tailor_objective.forward, self.student)]
        for objective, _, plain in saved:
            objective.forward = plain
        try:
            yield
        finally:
            for objective, forward, _ in saved:
                objective.forward = forward

    def finetune_step(self) -> None:
        self._step(self.ft_objective, self.ft_opt)

    def tailor_step(self) -> None:
        self._step(self.tailor_objective, self.tailor_opt)

    def train_mode(self) -> None:
        if hasattr(self, "full"):
            self.full.train()
        if hasattr(self, "student"):
            self.student.train()
            self.teacher.eval()

    def infer(self, model, x):
        def run():
            with torch.inference_mode(), self.amp_ctx():
                model(x)
        return run

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _student_total_macs(student, img_size: int) -> int:
    from tailor_cli.counting import student_macs

    return student_macs(student, img_size).total


def pruned_structure(student, drop_blocks: int | None):
    """A structure as pruning would leave it: ``drop_blocks`` blocks gone, a few proxies kept.

    Dropped blocks are spread over the stages, preferring blocks that do not change resolution
    (the ones NetTailor drops first in the paper). A layer that loses its block keeps its
    nearest proxy; every fourth layer also keeps one long skip. The result goes through
    :func:`tailor_cli.pruning.plan` (threshold 0.05), so it is a structure pruning can produce.
    """
    from tailor_cli.pruning import plan

    structure = student.structure
    L = structure.num_layers
    k = L // 2 if drop_blocks is None else max(0, min(int(drop_blocks), L - 1))
    plain = [l for l, info in enumerate(student.infos, 1) if info.index > 0]
    first = [l for l, info in enumerate(student.infos, 1) if info.index == 0 and l > 1]
    plain, first = plain[::-1], first[::-1]  # late blocks first
    order = plain[::2] + plain[1::2] + first  # spread over the stages, stage openers last
    rest = [l for l in range(1, L + 1) if l not in order]
    dropped = set((order + rest)[:k])
    alphas = []
    for l, spec in enumerate(structure.layers, 1):
        row = [0.1 if l in dropped else 0.9]
        for s in spec.proxies:
            keep = (s == l - 1 and l in dropped) or (l % 4 == 0 and s == l - 2)
            row.append(0.5 if keep else 0.01)
        alphas.append(row)
    result = plan(structure, alphas, threshold=0.05, drop_blocks=k)
    return k, result.structure


# --------------------------------------------------------------------------- timing
def interleaved(fns: dict, *, repeats: int, warmup: int, sync, inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function; the order alternates every repeat."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            for _ in range(inner):
                fns[n]()
        sync()
    out: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner):
                fns[n]()
            sync()
            out[n].append((time.perf_counter() - t0) / inner)
            cpu[n].append((time.process_time() - c0) / inner)
    return {n: out[n] for n in names} | {f"{n}_cpu": cpu[n] for n in names}


def step_macs(step) -> int:
    """MACs of one whole training step (forward and backward), counted by ``FlopCounterMode``.

    The tailor/finetune ratio of these is the floor a step-time ratio can reach when both
    steps run their arithmetic equally fast: the proxies add real work (at resnet34, 64 px
    about 10%) on top of the teacher pass and the input-gradient backward.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() // 2


def summary(times: list[float], cpu: list[float], images: int) -> dict:
    med = statistics.median(times)
    return {"seconds": med, "cpu_seconds": statistics.median(cpu), "images_per_s": images / med,
            "all_seconds": times}


# --------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _max_rss_bytes() -> int:
    """Peak RSS of this process image. Linux: VmHWM (``ru_maxrss`` would also count the parent's
    RSS at fork time, which the kernel carries over exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_child(args: argparse.Namespace) -> dict:
    """Runs in a fresh process: build one side, run warm-up + one step, report the peak."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.init()
    import timm  # noqa: F401  (imports count as baseline, not as the step)

    import tailor_cli.train  # noqa: F401

    baseline = _rss_bytes()
    setup = Setup(args, need=(args.memory_child,))
    setup.train_mode()
    step = setup.finetune_step if args.memory_child == "finetune" else setup.tailor_step
    if device.type == "cuda":
        for _ in range(max(1, args.warmup)):
            step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "method": "cuda max_memory_allocated"}
    for _ in range(max(1, args.warmup)):
        step()
    step()
    # VmHWM is updated lazily (per-thread RSS counters are batched), so it can briefly read below
    # the current RSS: take the larger, and never report a negative growth
    peak = max(_max_rss_bytes(), _rss_bytes())
    return {"peak_bytes": max(0, peak - baseline), "baseline_bytes": baseline,
            "method": "peak RSS growth over the interpreter baseline (fresh process)"}


def measure_memory(argv: list[str], kinds: tuple[str, ...] = ("finetune", "tailor")) -> dict[str, dict]:
    """One fresh process per step kind (run side by side: each reports its own peak)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    procs = {
        kind: subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--_memory-child", kind],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for kind in kinds
    }
    out = {}
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory measurement '{kind}' failed:\n{stderr[-2000:]}")
        out[kind] = json.loads(stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------- main
def run(args: argparse.Namespace, argv: list[str]) -> dict:
    from tailor_cli.counting import model_macs

    B, S = args.batch_size, args.img_size
    load_before = _loadavg()
    if (args.device == "cpu" and torch.get_num_threads() > 1 and "OMP_WAIT_POLICY" not in os.environ
            and load_before is not None and load_before > 0.5):
        log(f"note: load average {load_before} from other processes; OpenMP threads spin while they wait for "
            "a descheduled peer, which can make multi-threaded CPU timings several times slower and erratic. "
            "For stable numbers on a shared machine: OMP_WAIT_POLICY=PASSIVE, or --threads 1")
    log(f"building {args.backbone} (batch {B}, {S} px, {args.device})...")
    setup = Setup(args)
    full_macs = model_macs(setup.full, S)

    # -- training steps
    log(f"timing train steps ({args.warmup} warm-up + {args.repeats} repeats)...")
    setup.train_mode()
    t = interleaved({"finetune": setup.finetune_step, "tailor": setup.tailor_step},
                    repeats=args.repeats, warmup=args.warmup, sync=setup.sync)
    train = {n: summary(t[n], t[f"{n}_cpu"], B) for n in ("finetune", "tailor")}
    train["ratio"] = train["tailor"]["seconds"] / train["finetune"]["seconds"]
    train["cpu_ratio"] = train["tailor"]["cpu_seconds"] / train["finetune"]["cpu_seconds"]
    with setup.eager():
        train["macs"] = {"finetune": step_macs(setup.finetune_step), "tailor": step_macs(setup.tailor_step)}
    train["mac_ratio"] = train["macs"]["tailor"] / train["macs"]["finetune"]

    # -- inference
    setup.full.eval()
    setup.pruned.eval()
    mac_ratio = full_macs / setup.pruned_macs
    inference = {}
    for key, x, n, inner in (("batch_1", setup.image1, 1, args.batch1_iters), ("batch_b", setup.images, B, 1)):
        log(f"timing inference at batch {n}...")
        t = interleaved({"full": setup.infer(setup.full, x), "pruned": setup.infer(setup.pruned, x)},
                        repeats=args.repeats, warmup=max(args.warmup, 1), sync=setup.sync, inner=inner)
        row = {m: summary(t[m], t[f"{m}_cpu"], n) for m in ("full", "pruned")}
        row["batch_size"] = n
        row["speedup"] = row["pruned"]["images_per_s"] / row["full"]["images_per_s"]
        row["mac_ratio"] = mac_ratio
        row["efficiency"] = row["speedup"] / mac_ratio
        inference[key] = row

    # -- memory (fresh process per side)
    memory = None
    if args.memory:
        log("measuring peak memory (one subprocess per step kind)...")
        memory = measure_memory(argv)
        memory["ratio"] = memory["tailor"]["peak_bytes"] / max(memory["finetune"]["peak_bytes"], 1)

    def target(value, limit, below: bool):
        ok = None if value is None or not math.isfinite(value) else (value <= limit if below else value >= limit)
        return {"value": value, "limit": limit, "pass": ok}

    targets = {
        "train_step_ratio": target(train["ratio"], TARGETS["train_step_ratio"], True),
        "memory_ratio": target(memory["ratio"] if memory else None, TARGETS["memory_ratio"], True),
        "inference_efficiency_batch_1": target(inference["batch_1"]["efficiency"], TARGETS["inference_efficiency"], False),
        "inference_efficiency_batch_b": target(inference["batch_b"]["efficiency"], TARGETS["inference_efficiency"], False),
    }
    counts = setup.pruned.structure.counts()
    import timm

    from tailor_cli import defaults

    return {
        "config": {"backbone": args.backbone, "batch_size": B, "img_size": S, "device": str(setup.device),
                   "amp": bool(args.amp), "channels_last": bool(args.channels_last), "compile": bool(args.compile),
                   "repeats": args.repeats,
                   "warmup": args.warmup, "drop_blocks": setup.drop_blocks, "threads": torch.get_num_threads(),
                   "complexity_weight": defaults.COMPLEXITY_WEIGHT, "teacher_weight": defaults.TEACHER_WEIGHT,
                   "train_bn": defaults.TRAIN_BN,
                   "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
                   "machine": platform.machine(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
                   # other processes' load distorts CPU timings: 1-minute load average before/after
                   "load_average": [load_before, _loadavg()],
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "macs": {"full": full_macs, "student_full": setup.full_student_macs, "pruned": setup.pruned_macs,
                 "full_over_pruned": mac_ratio},
        "pruned_structure": counts,
        "train": train,
        "memory": memory,
        "inference": inference,
        "targets": targets,
        "all_pass": all(v["pass"] for v in targets.values() if v["pass"] is not None),
    }


def _cpu_model() -> str:
    """The CPU's marketing name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def format_table(res: dict) -> str:
    c, tr, inf, mem, tg = res["config"], res["train"], res["inference"], res["memory"], res["targets"]
    header = (f"{c['backbone']}  batch {c['batch_size']}  {c['img_size']} px  {c['device']}  amp={c['amp']}  "
              f"channels_last={c['channels_last']}  compile={c['compile']}  threads={c['threads']}  "
              f"median of {c['repeats']}  "
              f"(load average {c['load_average'][0]} -> {c['load_average'][1]} on {c['cpu_count']} CPUs: "
              f"{c['cpu_model']}; OMP_WAIT_POLICY={c['omp_wait_policy'] or 'unset'})")
    lines = [header,
             "",
             f"{'train step':<28}{'s/step':>10}{'cpu s':>10}{'img/s':>10}"]
    for n in ("finetune", "tailor"):
        lines.append(f"  {n:<26}{tr[n]['seconds']:>10.4f}{tr[n]['cpu_seconds']:>10.3f}{tr[n]['images_per_s']:>10.1f}")
    lines.append(f"  {'tailor / finetune':<26}{tr['ratio']:>10.3f}{tr['cpu_ratio']:>10.3f}")
    lines.append(f"  {'by MACs (the floor)':<26}{tr['mac_ratio']:>10.3f}"
                 f"   ({tr['macs']['tailor'] / 1e9:.2f} vs {tr['macs']['finetune'] / 1e9:.2f} GMACs per step)")
    if mem:
        lines += ["", f"{'peak memory':<28}{'MiB':>10}"]
        for n in ("finetune", "tailor"):
            lines.append(f"  {n:<26}{mem[n]['peak_bytes'] / 2**20:>10.1f}")
        lines.append(f"  {'tailor / finetune':<26}{mem['ratio']:>10.3f}   ({mem['finetune']['method']})")
    m = res["macs"]
    s = res["pruned_structure"]
    pruned = (f"pruned student: {s['blocks']} blocks, {s['proxies']} proxies; MACs/image full {m['full'] / 1e6:.1f}M, "
              f"pruned {m['pruned'] / 1e6:.1f}M (full/pruned {m['full_over_pruned']:.3f})")
    lines += ["", pruned,
              f"{'inference':<28}{'full img/s':>12}{'pruned img/s':>14}{'speed-up':>10}{'/ MACs':>9}"]
    for row in inf.values():
        lines.append(f"  batch {row['batch_size']:<20}{row['full']['images_per_s']:>12.1f}{row['pruned']['images_per_s']:>14.1f}"
                     f"{row['speedup']:>10.3f}{row['efficiency']:>9.3f}")
    lines += ["", "targets:"]
    for name, t in tg.items():
        op = "<=" if name in ("train_step_ratio", "memory_ratio") else ">="
        verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
        val = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        lines.append(f"  {name:<32}{val:>8} {op} {t['limit']:<6}{verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.memory_child:
            res = memory_child(args)
            print(json.dumps(res))
            return res
        res = run(args, [a for a in argv if a != "--json"])
    finally:
        torch.set_num_threads(threads)  # main() may be called from a longer-lived process
    if args.json:
        print(json.dumps(res))
    else:
        print(format_table(res))
    return res


if __name__ == "__main__":
    main()
