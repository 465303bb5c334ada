"""Runs under ``torchrun``: process group, device per rank, sharding of the pending pairs, and the final gather.

``torchrun --nproc-per-node N -m ddfm_fast fuse --ir-dir A --vis-dir B -o OUT`` starts N copies of the command;
each one finds itself here (:func:`env_from_environ`), takes its own GPU (``LOCAL_RANK``; CPU and gloo when
there is none), fuses its share of the pairs, and rank 0 writes the one ``OUT/ddfm_summary.json``. Without
torchrun (``WORLD_SIZE`` unset or 1) nothing here runs and the commands behave exactly as before.

The protocol of a distributed folder run (``ddfm-fast fuse``):

1. rank 0 takes the output folder's lock (:class:`ddfm_fast.resume.FolderLock`) before any rank loads the
   model, and tells every rank whether it got it (a second run into the folder ends on every rank with one
   line naming the other run's pid);
2. rank 0 removes stale temporary files and decides what is pending (:func:`ddfm_fast.runner.plan_resume`:
   only verified outputs count as done); its decision, or its error, is broadcast before any rank writes, so
   all ranks shard the same list, however many ranks an earlier, killed run had (resume);
3. :func:`lpt_shards` splits it: greedy longest-processing-time over the model's pixel count (H*W after
   padding / cropping to /32, from the headers), largest first, ties by stem, each to the least-loaded rank
   (ties: lowest rank);
4. each rank fuses its shard with :func:`ddfm_fast.runner.run_folder` (:func:`fuse_folder`), journaling each
   output's record before the output takes its name; a bad pair is recorded, never raised, so no rank leaves
   early (torchrun tears the whole group down when one worker exits);
5. :meth:`Context.gather` brings every rank's :class:`~ddfm_fast.summary.RunSummary` to rank 0 over a gloo
   group with a long timeout (ranks that finish early wait there for the slowest), rank 0 merges them
   (:func:`merge_summaries`) and writes the summary atomically (a failure is reported, not raised), rank 0
   broadcasts the exit code, all ranks meet at a barrier and exit together: 0, 3 on every rank when any pair
   failed on any rank, 1 when a rank had to stop (a full disk) or the summary could not be written.

Ctrl-C reaches every rank: each stops, and rank 0 writes a summary from what it knows plus every rank's journal
(the outputs done so far on all ranks) without waiting for the others.

Outputs do not depend on the rank or the world size: the initial noise comes from a CPU generator seeded per
image and the EM state is per image (``tau_reduce="image"``). On CPU, batched convolutions are not bitwise
batch-invariant, so runs keep ``--batch-size 1`` (the default) to be byte-identical to a single-process run at
the same thread count (torchrun sets ``OMP_NUM_THREADS=1`` per worker unless it is set).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import heapq
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch

from ddfm_fast import io
from ddfm_fast.summary import SUMMARY_NAME, RunSummary, now

T = TypeVar("T")

# A rank that finishes its shard waits for the slowest one at the final gather. The default process-group
# timeout (10 min for nccl) would fail a run whose ranks finish far apart, so the gather uses a gloo group with
# this timeout; DDFM_FAST_DIST_TIMEOUT_S overrides it.
ENV_TIMEOUT = "DDFM_FAST_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 24 * 3600


# --------------------------------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class DistEnv:
    """The variables torchrun sets for each worker."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_environ(environ: Optional[Mapping[str, str]] = None) -> Optional[DistEnv]:
    """The torchrun environment of this process, or ``None`` for a single-process run.

    Distributed means ``WORLD_SIZE`` > 1 with ``RANK``, ``LOCAL_RANK`` and ``MASTER_ADDR`` set (what torchrun
    exports). ``torchrun --nproc-per-node 1`` (``WORLD_SIZE=1``) is a plain single-process run. A partial or
    inconsistent environment is an error naming the variables, not a silent single-process run.
    """
    env = os.environ if environ is None else environ
    world_text = env.get("WORLD_SIZE")
    if world_text is None:
        return None
    try:
        world = int(world_text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={world_text!r} is not an integer (torchrun sets it)") from None
    if world <= 1:
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start distributed runs with "
                         "torchrun (torchrun --nproc-per-node N -m ddfm_fast ...), or unset WORLD_SIZE")
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside 0..{world - 1} (WORLD_SIZE={world})")
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


def choose_device(env: DistEnv, requested: Optional[str] = None) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available (or ``--device cuda`` without an index),
    an explicit ``cuda:K`` / ``cpu`` as given, else the CPU. Raises ``ValueError`` with what to do."""
    if requested is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(requested)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{requested!r} is not a torch device ({exc})") from exc
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"{requested!r}: CUDA is not available (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda}); use --device cpu")
    index = env.local_rank if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"rank {env.rank} (LOCAL_RANK={env.local_rank}) wants cuda:{index}, but this node has "
                         f"{count} GPU(s): start at most {count} processes per node (--nproc-per-node {count})")
    return torch.device("cuda", index)


def timeout_s(environ: Optional[Mapping[str, str]] = None) -> float:
    env = os.environ if environ is None else environ
    text = env.get(ENV_TIMEOUT)
    if text is None:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT}={text!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{ENV_TIMEOUT}={text!r} must be positive")
    return value


# --------------------------------------------------------------------------------------------------- sharding


def lpt_shards(keys: Sequence[str], costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Split items into ``world_size`` shards by greedy longest-processing-time; returns indices per rank.

    Items go largest cost first (ties: smaller key first), each to the rank with the least load so far (ties:
    the lowest rank). Deterministic for given keys and costs; each shard is returned sorted by key. LPT's
    largest shard is at most 4/3 of the optimum, and no two shards differ by more than the largest item.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if len(keys) != len(costs):
        raise ValueError(f"{len(keys)} keys but {len(costs)} costs")
    order = sorted(range(len(keys)), key=lambda i: (-int(costs[i]), keys[i]))
    loads = [(0, r) for r in range(world_size)]  # a heap of (load, rank)
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        load, r = heapq.heappop(loads)
        shards[r].append(i)
        heapq.heappush(loads, (load + int(costs[i]), r))
    return [sorted(s, key=lambda i: keys[i]) for s in shards]


def image_pixels(path: Path, size_policy: str = "pad", multiple: int = io.SIZE_MULTIPLE) -> int:
    """The model's pixel count for an image, from its header only: H*W of :func:`ddfm_fast.io.model_size` (padded
    up or cropped down to ``multiple``). An unreadable, too small or over-the-cap file costs 0 (it fails fast and
    is reported by its rank)."""
    try:
        w, h = io.image_size(path)  # EXIF rotation swaps W and H, which leaves the area unchanged
        if w * h > io.pixel_cap():  # refused when it is read: it costs nothing
            return 0
        (mh, mw), _ = io.model_size((h, w), size_policy, multiple)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a cost estimate must never fail rank 0 in the middle of a collective
        return 0
    return mh * mw


# --------------------------------------------------------------------------------------------------- process group


@dataclass
class Context:
    """An initialised process group for one command; use :func:`session` to create and tear it down."""

    env: DistEnv
    device: torch.device
    backend: str  # the default group's backend: nccl on CUDA, else gloo
    group: Any  # the gloo group of every object collective here (None: the default group is already gloo)
    timeout_s: float
    plan: Optional[dict[str, Any]] = None  # what plan_shards decided (for the summary)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> Optional[list[Any]]:
        """Every rank's ``obj``, in rank order, on rank 0; ``None`` on the other ranks."""
        import torch.distributed as dist

        out: Optional[list[Any]] = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def close(self) -> None:
        """Destroy the process group (idempotent)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "local_rank": self.env.local_rank, "host": socket.gethostname(),
                "device": str(self.device), "threads": torch.get_num_threads()}


def init(env: DistEnv, device: torch.device) -> Context:
    """Initialise the process group from torchrun's environment (``env://``) for a rank running on ``device``.

    The default group uses nccl on CUDA devices and gloo otherwise; every collective here goes through a gloo
    group with :func:`timeout_s`, so a rank may wait hours for the slowest one. Pair with :meth:`Context.close`
    (or use :func:`session`).
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"torch {torch.__version__} was built without torch.distributed; "
                           "run without torchrun, or install a torch build with distributed support")
    timeout = timeout_s()
    long = datetime.timedelta(seconds=timeout)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=long if backend == "gloo" else None)
    group = None if backend == "gloo" else dist.new_group(backend="gloo", timeout=long)
    return Context(env, device, backend, group, timeout)


@contextlib.contextmanager
def session(env: DistEnv, device: torch.device) -> Iterator[Context]:
    """``with session(env, device) as ctx:`` :func:`init`, then :meth:`Context.close` however the block ends."""
    ctx = init(env, device)
    try:
        yield ctx
    finally:
        ctx.close()


# --------------------------------------------------------------------------------------------------- fuse


def plan_shards(ctx: Context, pending: list[T], keys: Callable[[T], str], cost: Callable[[T], int]) -> list[T]:
    """This rank's share of rank 0's ``pending`` list (a collective: every rank must call it once).

    Rank 0 computes the costs and the LPT plan and broadcasts the shards; the other ranks' own ``pending``
    lists are ignored, so a file system that changes while the ranks start cannot make them disagree.
    """
    shards = None
    if ctx.is_main:
        costs = [cost(item) for item in pending]
        idx = lpt_shards([keys(item) for item in pending], costs, ctx.world_size)
        shards = [[pending[i] for i in s] for s in idx]
        plan = {"pairs": [len(s) for s in idx], "pixels": [sum(costs[i] for i in s) for s in idx]}
        shards_and_plan: Any = (shards, plan)
    else:
        shards_and_plan = None
    shards, ctx.plan = ctx.broadcast(shards_and_plan)
    return shards[ctx.rank]


class RankCoordinator:
    """:class:`ddfm_fast.runner.Coordinator` of one torchrun rank: rank 0's resume decision (or its error) on every
    rank, then this rank's LPT share of it."""

    def __init__(self, ctx: Context, cost: Callable[[Any], int]) -> None:
        self.ctx, self.cost = ctx, cost
        self.rank, self.world_size, self.is_main = ctx.rank, ctx.world_size, ctx.is_main

    def agree(self, error: Optional[BaseException], todo: Optional[list[Any]]) -> list[Any]:
        from ddfm_fast.pairing import InputError

        message, todo = self.ctx.broadcast((None if error is None else str(error), todo) if self.is_main else None)
        if message is not None:
            if error is not None:
                raise error
            raise InputError(message)
        return list(todo or [])

    def shard(self, todo: list[Any]) -> list[Any]:
        return plan_shards(self.ctx, todo, keys=lambda pr: pr.stem, cost=self.cost)

    def gather(self, obj: Any) -> Optional[list[Any]]:
        return self.ctx.gather(obj)


def merge_summaries(parts: Sequence[tuple[Any, dict[str, Any]]], plan: Optional[dict[str, Any]] = None,
                    backend: str = "gloo") -> dict[str, Any]:
    """One summary document from every rank's ``(RunSummary, rank info)``, in rank order.

    The document is what a single-process run writes (same keys, same meaning: rank 0's view of skipped,
    unpaired and ignored files; done and failed of all ranks, each entry tagged with its ``rank``), plus
    ``distributed``: world size, backend and one record per rank (images done and failed, pairs and pixels
    assigned, seconds, images/s). ``timing.images_per_s`` is the sum of the ranks' rates (each rank's images
    over its fusion time, the single-process definition); ``timing.images_per_wall_s`` is all images over
    the slowest rank's wall time.
    """
    main = parts[0][0]
    merged = RunSummary(settings=dict(main.settings), inputs=dict(main.inputs), output_dir=main.output_dir,
                        plan=None if main.plan is None else dict(main.plan), skipped=list(main.skipped),
                        replaced=list(main.replaced), unpaired=list(main.unpaired), ignored=list(main.ignored),
                        kept=dict(main.kept), identities=dict(main.identities), runs=list(main.runs),
                        settings_digest=main.settings_digest)
    merged.started = min(s.started for s, _ in parts)
    merged.finished = now()
    merged.complete = all(s.complete for s, _ in parts)
    merged.pending = sum(s.pending for s, _ in parts)
    stops = [f"rank {r}: {s.stopped}" for r, (s, _) in enumerate(parts) if s.stopped]
    merged.stopped = "; ".join(stops) or None
    merged.wall_s = max(s.wall_s for s, _ in parts)
    merged.fusion_s = sum(s.fusion_s for s, _ in parts)
    ranks = []
    for r, (s, info) in enumerate(parts):
        merged.done += [{**d, "rank": r} for d in s.done]
        merged.failed += [{**f, "rank": r} for f in s.failed]
        merged.warnings += [w for w in s.warnings if w not in merged.warnings]
        rate = s.images_per_s
        fallbacks = list((s.plan or {}).get("fallbacks", []))
        if merged.plan is not None and r > 0:  # rank 0's plan is the summary's; the others add their fallbacks
            merged.plan["fallbacks"] = [*merged.plan.get("fallbacks", []), *(f"rank {r}: {f}" for f in fallbacks)]
        ranks.append({**info, "rank": r, "fallbacks": fallbacks,
                      "pairs_assigned": None if plan is None else plan["pairs"][r],
                      "pixels_assigned": None if plan is None else plan["pixels"][r],
                      "done": len(s.done), "failed": len(s.failed), "complete": s.complete,
                      "wall_s": round(s.wall_s, 3), "fusion_s": round(s.fusion_s, 3),
                      "images_per_s": None if rate is None else round(rate, 4)})
    for records in (merged.done, merged.failed):
        records.sort(key=lambda rec: rec.get("stem", ""))
    doc = merged.to_dict()
    rates = [s.images_per_s for s, _ in parts if s.images_per_s is not None]
    doc["timing"]["images_per_s"] = round(sum(rates), 4) if rates else None
    doc["timing"]["images_per_wall_s"] = (round(len(merged.done) / merged.wall_s, 4)
                                          if merged.done and merged.wall_s > 0 else None)
    doc["distributed"] = {"world_size": len(parts), "backend": backend, "gather_backend": "gloo", "ranks": ranks}
    return doc


def finish_fuse(ctx: Context, summary: Any, out_dir: Path, failed_code: int) -> tuple[int, Optional[dict[str, Any]]]:
    """Gather the ranks' summaries, write ``OUT/ddfm_summary.json`` on rank 0, agree on the exit code.

    Returns ``(exit code, merged summary on rank 0 / None elsewhere)``; every rank gets the same code:
    0, ``failed_code`` when any pair failed on any rank, 1 when a rank stopped early (``doc["stopped"]``) or
    rank 0 could not write the summary (``doc["write_error"]``, one line; the journals keep the records then).
    """
    from ddfm_fast import resume
    from ddfm_fast.summary import write_summary

    parts = ctx.gather((summary, ctx.describe()))
    code, doc = 0, None
    if ctx.is_main:
        assert parts is not None
        doc = merge_summaries(parts, ctx.plan, ctx.backend)
        code = 1 if doc["stopped"] else (failed_code if doc["failed"] else 0)
        try:
            write_summary(doc, Path(out_dir) / SUMMARY_NAME)
            resume.remove_journals(resume.journal_paths(Path(out_dir)))  # every rank has finished writing them
        except OSError as exc:
            code = 1
            doc["write_error"] = f"{Path(out_dir) / SUMMARY_NAME}: cannot write it ({exc.strerror or exc})"
    code = ctx.broadcast(code)
    ctx.barrier()
    return code, doc


# --------------------------------------------------------------------------------------------------- eval


def finish_eval(ctx: Context, rows: dict[str, Any], skipped: list[Any]) -> Optional[tuple[dict[str, Any], list[Any]]]:
    """Gather every rank's scored rows and scoring skips on rank 0 (``None`` elsewhere)."""
    parts = ctx.gather((rows, skipped))
    if parts is None:
        return None
    all_rows: dict[str, Any] = {}
    all_skipped: list[Any] = []
    for r, s in parts:
        all_rows.update(r)
        all_skipped += s
    return all_rows, all_skipped


def agree_exit(ctx: Context, code: int) -> int:
    """Rank 0's exit code on every rank, after a barrier (rank 0 has written its files by then)."""
    code = ctx.broadcast(code)
    ctx.barrier()
    return int(code)


def replace_pairing_for_rank(pairing: Any, rank: int) -> Any:
    """Unpaired, ignored and ambiguous files are rank 0's to report: the other ranks drop them."""
    if rank == 0:
        return pairing
    return dataclasses.replace(pairing, unmatched=[], ignored=[])


def fuse_folder(env: DistEnv, device: torch.device, model_loader: Callable[[], Any], pairing: Any, out_dir: Path,
                run: Any, *, failed_code: int, bar: Any = None,
                **run_folder_args: Any) -> tuple[int, Optional[dict[str, Any]]]:
    """One rank of a torchrun folder run: rank 0 locks the output folder (before any rank calls ``model_loader``),
    rank 0's resume decision is sharded (LPT over the model's pixel counts), this rank fuses its share with
    :func:`ddfm_fast.runner.run_folder`, and :func:`finish_fuse`.

    ``run_folder_args`` go to ``run_folder`` (plan, overwrite, extra_settings, inputs, progress_dir, on_event,
    warn); rank 0 alone shows the progress bars. Returns ``(exit code shared by all ranks, merged summary on
    rank 0)``. A lock held by another run raises :class:`ddfm_fast.resume.FolderBusyError` on every rank.
    """
    from ddfm_fast import resume
    from ddfm_fast.runner import run_folder

    side = "vis" if run.resize == "vis" else "ir"  # the side whose size the model sees
    policy = run.sampler.size_policy
    with session(env, device) as ctx:
        lock, error = None, None
        if ctx.is_main:
            try:
                lock = resume.FolderLock(Path(out_dir)).acquire()
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or they wait in the broadcast
                error = exc
        message = ctx.broadcast(None if error is None else str(error))
        if message is not None:
            if error is not None:
                raise error
            raise resume.FolderBusyError(message)
        try:
            model = model_loader()
            coordinator = RankCoordinator(ctx, cost=lambda pr: image_pixels(getattr(pr, side), policy))
            summary = run_folder(model, replace_pairing_for_rank(pairing, env.rank), out_dir, run, device=device,
                                 bar=bar if env.is_main else None, step_bar=bar if env.is_main else None,
                                 coordinator=coordinator, lock=lock, write_summary=False, **run_folder_args)
            return finish_fuse(ctx, summary, out_dir, failed_code)
        finally:
            if lock is not None:
                lock.release()
