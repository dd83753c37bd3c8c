"""The operator's commands: ``mlpm-guard prototypes init|history|diff|rollback|teach``,
``mlpm-guard calibrate`` and ``mlpm-guard decisions``, and the decision-log options of ``serve``.

They work on a decision log (``--log``: a SQLite file or any SQLAlchemy URL) and a prototypes store
(:mod:`mlpm_guard.estimator.prototype_store`). Only ``teach`` loads the backbone; the others read files and
the database.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .vocabulary.errors import ConfigError

__all__ = ["add_commands", "add_serve_options", "load_backbone", "serve_settings"]


def load_backbone(spec: str | None, args: argparse.Namespace) -> Any:
    """The backbone a command names (``--backbone``, default embedded) on ``--device``/``--dtype``/``--threads``."""
    from .model.backbone import Backbone

    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    return Backbone(spec or "embedded", device=args.device, dtype=args.dtype,
                    **({"num_threads": threads} if threads else {}))


# ---------------------------------------------------------------------- serve
def add_serve_options(p: argparse.ArgumentParser) -> None:
    """``serve``'s decision-log and prototypes-store options."""
    p.add_argument("--decision-log", metavar="DB",
                   help="log every decision to this SQLite file or SQLAlchemy URL, and serve the review page at /review")
    p.add_argument("--log-text", action="store_true",
                   help="keep the prompts' text in the decision log (default: only a SHA-256 of each)")
    p.add_argument("--log-retention-days", type=float, default=30.0,
                   help="delete logged decisions older than this (default 30; 0 keeps them forever)")
    p.add_argument("--prototypes-store", metavar="DIR",
                   help="serve the current version of this prototypes store (`mlpm-guard prototypes init DIR`) and "
                        "follow teaching and rollbacks without a restart; replaces --prototypes")


def serve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~mlpm_guard.server.ServerSettings` fields of those options.

    With ``--prototypes-store``, ``args.prototypes`` is set to the store's current folder, so the
    guard starts on it instead of loading the default prototypes first.
    """
    from .guardrail.decision_log import DecisionLogSettings

    out: dict[str, Any] = {}
    if args.decision_log:
        out["decision_log"] = DecisionLogSettings(url=args.decision_log, store_text=args.log_text,
                                                  retention_days=args.log_retention_days or None)
    elif args.log_text:
        raise ConfigError("--log-text needs --decision-log DB")
    if args.prototypes_store:
        from .estimator.prototype_store import PrototypeStore

        if args.prototypes:
            raise ConfigError("give --prototypes-store or --prototypes, not both (the store names its own folder)")
        store = PrototypeStore(args.prototypes_store)
        args.prototypes = str(store.path())
        out["prototypes_store"] = str(store.root)
    return out


# ---------------------------------------------------------------------- prototypes
def cmd_prototypes_init(args: argparse.Namespace) -> int:
    from .estimator.prototype_store import PrototypeStore
    from .estimator.shipped import shipped_prototypes_dir

    source = Path(args.source) if args.source else shipped_prototypes_dir()
    store = PrototypeStore.create(args.store, source)
    print(f"started {store.root} at v0001 from {source}")
    return 0


def cmd_prototypes_history(args: argparse.Namespace) -> int:
    from .estimator.prototype_store import PrototypeStore

    history = PrototypeStore(args.store).history()
    if args.json:
        for info in history:
            print(info.model_dump_json())
        return 0
    for info in history:
        mark = "*" if info.current else " "
        taught = ", ".join(f"{'fine' if c.label == 'safe' else 'harmful'}: {_short(c.text)}" for c in info.corrections)
        print(f"{mark} {info.version}  parent {info.parent or '-':6}  {info.created}  "
              f"{len(info.corrections)} correction(s){'  ' + taught if taught else ''}")
    return 0


def cmd_prototypes_diff(args: argparse.Namespace) -> int:
    from .estimator.prototype_store import PrototypeStore

    diff = PrototypeStore(args.store).diff(args.old, args.new)
    if args.json:
        print(diff.model_dump_json(indent=2))
        return 0
    print(f"{diff.old} -> {diff.new}: threshold {diff.threshold[0]:g} -> {diff.threshold[1]:g}")
    for sign, items in (("+", diff.added), ("-", diff.removed)):
        for c in items:
            label = "fine" if c.label == "safe" else f"harmful{' ' + c.category if c.category else ''}"
            print(f"{sign} {label}: {c.text}")
    for sign, names in (("+", diff.prototypes_added), ("-", diff.prototypes_removed)):
        for name in names:
            print(f"{sign} prototype {name}")
    return 0


def cmd_prototypes_rollback(args: argparse.Namespace) -> int:
    from .estimator.prototype_store import PrototypeStore

    store = PrototypeStore(args.store)
    before = store.current
    version = store.rollback(args.version)
    print(f"{store.root}: {before} -> {version} (servers watching the store load it within seconds)")
    return 0


def cmd_prototypes_teach(args: argparse.Namespace) -> int:
    from .estimator.prototype_store import PrototypeStore, harmful_probes, teaching_cost
    from .guardrail.decision_log import Correction, DecisionLog

    store = PrototypeStore(args.store)
    log = DecisionLog(args.log) if args.log else None
    corrections = [Correction(text=t, label="safe") for t in args.safe or []]
    corrections += [Correction(text=t, label="unsafe", category=args.category) for t in args.unsafe or []]
    from_log = log.corrections(pending=True) if log is not None else []
    corrections += from_log
    if not corrections:
        raise ConfigError("nothing to teach: give --safe/--unsafe texts, or --log DB with pending corrections "
                          "(marked on the review page)")
    backbone = load_backbone(args.backbone, args)
    cost = teaching_cost(store.load(backbone=backbone), corrections, backbone, harmful_probes())
    print(f"{len(corrections)} correction(s) on {store.current}; held-back harmful probes flagged: "
          f"{cost.flagged_before}/{cost.n_probes} now, {cost.flagged_after}/{cost.n_probes} after")
    for c, before, after in zip(corrections, cost.corrected_before, cost.corrected_after):
        print(f"  {'fine' if c.label == 'safe' else 'harmful'}: P(unsafe) {before:.3f} -> {after:.3f}  {_short(c.text)}")
    for text in cost.flipped:
        print(f"  no longer flagged: {_short(text)}")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    if args.max_flips is not None and len(cost.flipped) > args.max_flips:
        print(f"not applied: {len(cost.flipped)} harmful probe(s) would no longer be flagged "
              f"(--max-flips {args.max_flips})", file=sys.stderr)
        return 1
    info = store.teach(corrections, backbone)
    if log is not None:
        log.mark_applied([c.id for c in from_log if c.id is not None], info.version)
        log.close()
    print(f"wrote {info.version} (parent {info.parent}); it is now current")
    return 0


# ---------------------------------------------------------------------- calibrate
def cmd_calibrate(args: argparse.Namespace) -> int:
    from .guardrail.calibration import calibrate_from_log
    from .guardrail.guard import as_policy

    report = calibrate_from_log(args.log, as_policy(args.policy), max_flag_rate=args.max_flag_rate,
                                max_controversial_rate=args.max_controversial_rate, hours=args.hours)
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(report.text())
    if args.out:
        report.policy.to_file(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------- decisions
def cmd_decisions(args: argparse.Namespace) -> int:
    from .guardrail.decision_log import DecisionFilter, DecisionLog
    from .vocabulary.types import Route

    where = DecisionFilter(route=Route(args.route) if args.route else None, category=args.category,
                           min_p_unsafe=args.min_p, since=time.time() - args.hours * 3600 if args.hours else None,
                           limit=args.limit)
    with DecisionLog(args.log) as log:
        for row in log.decisions(where):
            print(row.model_dump_json())
    return 0


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def add_commands(sub: Any, parents: dict[str, argparse.ArgumentParser]) -> None:
    """Register ``prototypes``, ``calibrate`` and ``decisions`` on the ``mlpm-guard`` parser."""
    p = sub.add_parser("prototypes", help="versioned prototypes: init, history, diff, rollback, teach",
                       description="A prototypes store holds one folder per version and a CURRENT file. Teaching "
                                   "writes a new version (the current one plus the corrections, no training); "
                                   "rollback moves CURRENT back. `mlpm-guard serve --prototypes-store DIR` follows it.")
    p.set_defaults(quiet=False)
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("init", help="start a store from a prototypes folder (default: the shipped prototypes)")
    a.add_argument("store", metavar="STORE")
    a.add_argument("--from", dest="source", metavar="DIR", help="a folder written by `mlpm-guard fit ... --out DIR`")
    a.set_defaults(func=cmd_prototypes_init)
    a = actions.add_parser("history", help="every version, its parent and what it was taught (* = current)")
    a.add_argument("store", metavar="STORE")
    a.add_argument("--json", action="store_true", help="one JSON record per version")
    a.set_defaults(func=cmd_prototypes_history)
    a = actions.add_parser("diff", help="corrections and prototypes between two versions")
    a.add_argument("store", metavar="STORE")
    a.add_argument("old", metavar="OLD")
    a.add_argument("new", metavar="NEW", nargs="?", help="default: the current version")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_prototypes_diff)
    a = actions.add_parser("rollback", help="make an earlier version current (default: the current one's parent)")
    a.add_argument("store", metavar="STORE")
    a.add_argument("version", metavar="VERSION", nargs="?")
    a.set_defaults(func=cmd_prototypes_rollback)
    a = actions.add_parser("teach", parents=[parents["common"]],
                           help="teach corrections (from the log's review page, or given here) as a new version",
                           description="Shows what the corrections would cost on the project's held-back harmful "
                                       "probes, then writes the new version and makes it current.")
    a.add_argument("store", metavar="STORE")
    a.add_argument("--log", metavar="DB", help="apply the corrections pending in this decision log")
    a.add_argument("--safe", nargs="+", metavar="TEXT", help="texts that were fine")
    a.add_argument("--unsafe", nargs="+", metavar="TEXT", help="texts that were harmful")
    a.add_argument("--category", help="hazard code of the --unsafe texts (S1..S14)")
    a.add_argument("--max-flips", type=int, metavar="N",
                   help="do not apply if more than N held-back harmful probes would no longer be flagged")
    a.add_argument("--dry-run", action="store_true", help="show the cost only")
    a.set_defaults(func=cmd_prototypes_teach)

    p = sub.add_parser("calibrate", help="propose policy lines from logged traffic at a chosen flag rate",
                       description="Reads the decision log's scored requests (less those marked harmful on the "
                                   "review page) as ordinary traffic and proposes the refusal and safety-prompt "
                                   "lines that flag at most --max-flag-rate of it, with what each would have "
                                   "changed, next to the strict, balanced and permissive presets.")
    p.add_argument("--log", required=True, metavar="DB", help="the decision log (SQLite file or SQLAlchemy URL)")
    p.add_argument("--max-flag-rate", type=float, required=True, metavar="R",
                   help="largest share of the logged traffic that may be refused (e.g. 0.01)")
    p.add_argument("--max-controversial-rate", type=float, metavar="R",
                   help="largest share that may get the safety prompt or worse (default: twice --max-flag-rate)")
    p.add_argument("--policy", help="the policy to start from: a preset (strict, balanced, permissive) or a file")
    p.add_argument("--hours", type=float, help="only decisions of the last H hours")
    p.add_argument("--out", metavar="FILE", help="write the proposed policy here (.yaml or .json)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate, quiet=False)

    p = sub.add_parser("decisions", help="print logged decisions as JSON lines, newest first")
    p.add_argument("--log", required=True, metavar="DB")
    p.add_argument("--route", choices=["pass", "safety_prompt", "steer", "refuse"])
    p.add_argument("--category")
    p.add_argument("--min-p", type=float, help="only P(unsafe) at least this")
    p.add_argument("--hours", type=float, help="only the last H hours")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=cmd_decisions, quiet=False)
