#!/usr/bin/env python3
"""bench_dedupe - quality and speed of ``aml optimize dedupe`` (issue 15).

1. Generates a store with bench_aml's generator (5 % planted near-duplicates: a recent record's
   content again under a new id with one wording change) and records which records were
   planted together, by wrapping the generator's body and render functions (nothing of
   bench_aml is changed).
2. Adds, in a second store, hard negatives as the test suite builds them: pairs of copies of a
   generated record whose main text differs only in one number, version, path, error code or
   identifier, or whose outcome disagrees.
3. Runs detection (report only) and prints per record type: planted pairs, the pairs the rules
   forbid to merge (bench_aml renders each copy with fresh metadata, so some copies disagree in
   outcome, state, or a decision's ticket and team size), recall over the admissible planted
   pairs and over all, the merges no plant explains, and precision on the hard negatives.
4. Times detection in-process (CPU seconds) and as a whole ``aml.py STORE optimize dedupe``
   process (wall time, peak RSS) next to the JSON parse floor of the same files (CPU seconds,
   best of three), at two store sizes, and prints the ratios and the time per record at each
   size (near-linear means about equal).

Usage::

    python3 bench_dedupe.py --size 20 --small 5        # figures for README "Consolidation"

Standard library only; keep sizes small on a shared machine.
"""

import argparse
import collections
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Set, Tuple

import bench_aml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import aml  # noqa: E402

TYPES = {"patterns.json": "pattern", "solutions.json": "solution", "decisions.json": "decision"}
MAIN_TEXT = {"pattern": ("pattern", "approach", "rationale"),
             "solution": ("solution", "fixApproach"), "decision": ("decision", "question")}


# -- 1. a store whose plants are known -------------------------------------------

Plants = Dict[Tuple[str, str], List[Set[str]]]


def generate_with_plants(root: Path, size_mb: float, seed: int, encoding: str = "mixed"
                         ) -> Plants:
    """Generate the store; returns {(agent, file): [ids planted together]} (groups of 2+)."""
    groups: Dict[Tuple[str, str, int], Set[str]] = collections.defaultdict(set)
    counter = iter(range(1 << 62))
    original = dict(bench_aml.KINDS)

    def wrap(kind: str) -> Tuple[Any, Any]:
        make_body, render = original[kind]

        def body(rng: random.Random) -> Dict[str, Any]:
            made = make_body(rng)
            made["_plant"] = next(counter)  # copied into every near-duplicate (dict(body))
            return made

        def rendered(rng: random.Random, agent: str, clock: Any, made: Dict[str, Any]) -> str:
            text = render(rng, agent, clock, made)
            groups[(agent, kind, made["_plant"])].add(text[15:51])
            return text
        return body, rendered

    bench_aml.KINDS.update({kind: wrap(kind) for kind in original})
    try:
        bench_aml.generate_store(root, size_mb, seed=seed, encoding=encoding, jobs=1)
    finally:
        bench_aml.KINDS.update(original)
    out: Dict[Tuple[str, str], List[Set[str]]] = collections.defaultdict(list)
    for (agent, kind, _), ids in groups.items():
        if len(ids) > 1:
            out[(agent, kind)].append(ids)
    return out


# -- 2. hard negatives -------------------------------------------------------------

def _set(record: Dict[str, Any], path: Tuple[str, ...], value: str) -> None:
    aml.dig(record, *path[:-1])[path[-1]] = value


HARD = {
    "number": lambda rng: ("within %d seconds" % rng.randint(2, 500),) * 2,
    "version": lambda rng: ("on node %d.%d" % (rng.randint(10, 22), rng.randint(0, 9)),) * 2,
    "path": lambda rng: ("in src/%s/%s.ts" % (rng.choice(["api", "ui", "db"]),
                                             rng.choice(["users", "orders", "cart"])),) * 2,
    "error code": lambda rng: (rng.choice(["ECONNREFUSED", "ETIMEDOUT", "ENOENT", "EACCES",
                                           "E1042", "HTTP503"]),) * 2,
    "identifier": lambda rng: (rng.choice(["userId", "orderTotal", "cart_items",
                                           "session.token", "avatarUrl"]),) * 2,
}


def _vary(kind: str, first: str, rng: random.Random) -> str:
    """Another value of the same kind, different from ``first``."""
    while True:
        other = HARD[kind](rng)[0]
        if other != first:
            return other


def _outcome_pair(rtype: str, a: Dict[str, Any], b: Dict[str, Any]) -> None:
    if rtype == "pattern":
        a["metrics"].update(successRate=0.95, executionCount=40)
        b["metrics"].update(successRate=0.05, executionCount=40)
    elif rtype == "solution":
        a["effectiveness"]["worked"], b["effectiveness"]["worked"] = True, False
    else:
        out = {"successMetrics": {}, "lessonsLearned": [], "wouldRepeat": True}
        a["outcome"], b["outcome"] = dict(out), dict(out, wouldRepeat=False)


WORDING = (".", " (again)", " for this team", "!")  # bench_aml._near_duplicate's changes


def build_hard_negatives(source: Path, target: Path, per_class: int, seed: int
                         ) -> Dict[str, List[Tuple[str, str, str]]]:
    """A store of hard-negative pairs built from ``source``'s records, plus as many clean
    twins (a copy under a new id with one of bench_aml's wording changes and nothing else
    changed, class ``twin``); returns per type the (class, id a, id b) of every pair."""
    rng = random.Random(seed)
    pairs: Dict[str, List[Tuple[str, str, str]]] = collections.defaultdict(list)
    agent = aml.Store(source).agents()[0]
    (target / agent).mkdir(parents=True)
    shutil.copy(source / "config.json", target / "config.json")
    for name, rtype in TYPES.items():
        records = aml.load_json_file(source / agent / name)[0]
        kinds = list(HARD) + ["outcome", "twin"]
        picks = rng.sample(range(len(records)), min(len(records), per_class * len(kinds)))
        out = []
        for n, index in enumerate(picks):
            kind = kinds[n % len(kinds)]
            a, b = (json.loads(json.dumps(records[index])) for _ in range(2))
            a["id"], b["id"] = ("%s-hard-%d-%s" % (rtype, n, s) for s in "ab")
            a["active"] = b["active"] = True
            text = aml.dig(a, *MAIN_TEXT[rtype])
            if kind == "twin":
                _set(b, MAIN_TEXT[rtype], text + rng.choice(WORDING))
            elif kind == "outcome":
                _outcome_pair(rtype, a, b)
            else:
                first = HARD[kind](rng)[0]
                _set(a, MAIN_TEXT[rtype], "%s %s" % (text, first))
                _set(b, MAIN_TEXT[rtype], "%s %s" % (text, _vary(kind, first, rng)))
            out += [a, b]
            pairs[rtype].append((kind, a["id"], b["id"]))
        aml.write_json_file(target / agent / name, out)
    return pairs


# -- 3. quality --------------------------------------------------------------------

def found_pairs(result: "aml.DedupeResult") -> Dict[str, Set[Tuple[str, str, str]]]:
    """Per type, the (file, id, id) pairs a run would merge (survivor with each member)."""
    out: Dict[str, Set[Tuple[str, str, str]]] = collections.defaultdict(set)
    for cluster in result.clusters:
        for member in cluster.members:
            a, b = sorted((cluster.survivor_id, member["id"]))
            out[cluster.type].add((cluster.file, a, b))
    return out


def _admissible(store: "aml.Store", plants: Dict[Tuple[str, str], List[Set[str]]]
                ) -> Dict[str, Dict[str, Any]]:
    """Per type: planted pairs and why the rules forbid some of them (aml's own guard)."""
    stats: Dict[str, Dict[str, Any]] = {t: {"planted": set(), "admissible": set(),
                                            "forbidden": collections.Counter()}
                                        for t in TYPES.values()}
    for (agent, name), groups in plants.items():
        rtype = aml.RecordType.from_filename(name)
        records = aml.load_json_file(store.root / agent / name)[0]
        index = {r["id"]: i for i, r in enumerate(records)}
        finder = aml._FileDedupe(rtype, records, 0.0)
        for ids in groups:
            ids = sorted(i for i in ids if i in index)
            for n, a in enumerate(ids):
                for b in ids[n + 1:]:
                    pair = ("%s/%s" % (agent, name), a, b)
                    stats[rtype.value]["planted"].add(pair)
                    ca, cb = finder.candidate(index[a]), finder.candidate(index[b])
                    why = aml.guard_conflict(ca, cb) if ca and cb else ("shared id", "")
                    if why is None:
                        stats[rtype.value]["admissible"].add(pair)
                    else:
                        stats[rtype.value]["forbidden"][why[0]] += 1
    return stats


def quality(store_root: Path, plants: Dict[Tuple[str, str], List[Set[str]]], hard_root: Path,
            hard: Dict[str, List[Tuple[str, str, str]]], threshold: float) -> List[str]:
    store = aml.Store(store_root)
    found = found_pairs(aml.dedupe_store(store, threshold))
    truth = _admissible(store, plants)
    hard_result = aml.dedupe_store(aml.Store(hard_root), threshold)
    hard_found = found_pairs(hard_result)
    held = collections.Counter(h["guard"] for h in hard_result.held_apart)
    lines = ["| type | planted pairs | pairs the rules forbid | recall, planted records with "
             "an admissible twin | recall, all planted records | merges no plant explains | "
             "recall, clean twins | hard-negative pairs | false merges | "
             "precision on hard negatives |", "|---" * 10 + "|"]
    for rtype in TYPES.values():
        t, f = truth[rtype], found[rtype]
        planted_ids = {p[1:] for p in t["planted"]}
        hits_adm, hits_all = _recalled(t["admissible"], f), _recalled(t["planted"], f)
        stray = len([p for p in f if p[1:] not in planted_ids])
        pairs = {tuple(sorted(p[1:])) for p in hard[rtype] if p[0] != "twin"}
        twins = {tuple(sorted(p[1:])) for p in hard[rtype] if p[0] == "twin"}
        false = len([p for p in hard_found[rtype] if p[1:] in pairs])
        twins_found = _recalled({("", a, b) for a, b in twins}, hard_found[rtype])[0] // 2
        lines.append("| %s | %d | %d (%s) | %s | %s | %d | %s | %d | %d | %s |" % (
            rtype, len(t["planted"]), sum(t["forbidden"].values()),
            ", ".join("%s %d" % kv for kv in sorted(t["forbidden"].items())) or "-",
            _ratio(*hits_adm), _ratio(*hits_all),
            stray, _ratio(twins_found, len(twins)), len(pairs), false,
            _ratio(len(pairs) - false, len(pairs))))
    lines.append("")
    lines.append("clean twins missed: %s (Jaccard of each, below the threshold means short "
                 "text where the wording change is a large share)"
                 % (_missed_twins(hard_root, hard, hard_found) or "none"))
    total = sum(1 for v in hard.values() for p in v if p[0] != "twin")
    lines.append("hard negatives: %d of %d pairs are at or over the threshold, so only the "
                 "guard keeps them apart; it did, per class: %s"
                 % (sum(held.values()), total,
                    ", ".join("%s %d" % kv for kv in sorted(held.items()))))
    return lines


def _missed_twins(root: Path, hard: Dict[str, List[Tuple[str, str, str]]],
                  found: Dict[str, Set[Tuple[str, str, str]]]) -> str:
    out = []
    for name, rtype in TYPES.items():
        clustered = _components(_partners(found[rtype]))
        missed = [p for p in hard[rtype] if p[0] == "twin" and (
            clustered.get(p[1]) is None or clustered.get(p[1]) != clustered.get(p[2]))]
        if not missed:
            continue
        path = next(root.glob("*/" + name))
        records = aml.load_json_file(path)[0]
        index = {r["id"]: i for i, r in enumerate(records)}
        finder = aml._FileDedupe(aml.RecordType(rtype), records, 0.0)
        scores = sorted(round(aml.jaccard(finder.candidate(index[a]).shingles,
                                          finder.candidate(index[b]).shingles), 2)
                        for _, a, b in missed)
        out.append("%s %s" % (rtype, scores))
    return "; ".join(out)


def _recalled(pairs: Set[Tuple[str, str, str]], found: Set[Tuple[str, str, str]]
              ) -> Tuple[int, int]:
    """(planted records found, planted records): a record of a planted pair counts as found
    when a run clusters it with a record it was planted with. (Clusters are built around a
    survivor, so two copies that may merge with each other but not with the survivor of
    their third copy stay apart: pairs would undercount.)"""
    planted = _partners(pairs)
    clustered = _components(_partners(found))
    hits = sum(1 for rid, mates in planted.items()
               if any(clustered.get(rid) is not None and clustered.get(rid) == clustered.get(m)
                      for m in mates))
    return hits, len(planted)


def _partners(pairs: Iterable[Tuple[str, str, str]]) -> Dict[str, Set[str]]:
    """{record id: the ids it is paired with}."""
    out: Dict[str, Set[str]] = collections.defaultdict(set)
    for _, a, b in pairs:
        out[a].add(b)
        out[b].add(a)
    return out


def _components(partners: Dict[str, Set[str]]) -> Dict[str, int]:
    """{record id: number of its cluster} (clusters as connected merges)."""
    label: Dict[str, int] = {}
    for number, start in enumerate(partners):
        todo = [start] if start not in label else []
        while todo:
            rid = todo.pop()
            if rid not in label:
                label[rid] = number
                todo.extend(partners[rid])
    return label


def _ratio(hits: int, total: int) -> str:
    return "%.3f (%d/%d)" % (hits / total, hits, total) if total else "n/a"


# -- 4. speed ----------------------------------------------------------------------

def speed(root: Path, threshold: float) -> Dict[str, Any]:
    """Parse floor, in-process detection and the whole process (with peak RSS) on one store."""
    files = [p for p in sorted(root.glob("*/*.json")) if p.name in TYPES]
    # CPU seconds of this process, the best of three for the floor: the machine is shared,
    # and wall time there measures the neighbours as much as the work.
    floors = []
    for _ in range(3):
        started = time.process_time()
        bench_aml.floor_parse_write(files, root.parent / "scratch", write_back=False)
        floors.append(time.process_time() - started)
    store = aml.Store(root)
    started = time.process_time()
    result = aml.dedupe_store(store, threshold)
    detect = time.process_time() - started
    run = bench_aml.run_process([sys.executable, str(HERE / "aml.py"), str(root), "optimize",
                                 "dedupe", "--threshold", str(threshold), "-q"])
    largest = max(len(aml.load_json_text(p)[2].encode("utf-8")) for p in files)
    return {"records": result.records, "bytes": sum(p.stat().st_size for p in files),
            "parse": min(floors), "detect": detect, "process": run.seconds,
            "rss_mib": run.maxrss_mb, "largest_file_mib": largest / bench_aml.MB,
            "clusters": len(result.clusters), "code": run.code}


def speed_lines(figures: List[Dict[str, Any]]) -> List[str]:
    lines = ["| store | records | JSON parse floor (CPU) | detection, in-process (CPU) | ratio | "
             "whole process (wall) | µs per record (CPU) | peak RSS | largest file (JSON) |",
             "|---" * 9 + "|"]
    for f in figures:
        lines.append("| %.1f MiB | %d | %.2f s | %.2f s | %.1fx | %.2f s | %.0f | %.0f MiB | "
                     "%.1f MiB |" % (f["bytes"] / bench_aml.MB, f["records"], f["parse"],
                                     f["detect"], f["detect"] / f["parse"], f["process"],
                                     1e6 * f["detect"] / f["records"], f["rss_mib"],
                                     f["largest_file_mib"]))
    return lines


# What the detector's stages cost on the same files, each with all the stages before it (CPU,
# best of three): the floor a faster detector of the same kind cannot go below, and a
# shingler stripped to its least (top-level strings only, word hashes by hash()) beside it.
_WORD_BYTES = bytes(b if (chr(b).isalnum() or b >= 0x80) else 0x20 for b in range(256)).lower()


def _least_shingles(record: Dict[str, Any]) -> Dict[int, int]:
    text = " ".join([v for v in record.values() if v.__class__ is str])
    ids = list(map(hash, text.lower().encode("utf-8", "surrogatepass").translate(
        _WORD_BYTES).split()))
    ordered = sorted(set(map(hash, zip(ids, ids[1:], ids[2:]))), reverse=True)
    return dict(zip(map((63).__and__, ordered), ordered))


def stage_costs(root: Path) -> List[str]:
    """The cost ladder of detection on one store, as multiples of its JSON parse."""
    texts = [(aml.RecordType(TYPES[p.name]), aml.load_json_text(p)[2])
             for p in sorted(root.glob("*/*.json")) if p.name in TYPES]

    def run(per_record: Any) -> float:
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            for rtype, text in texts:
                shingler = aml._Shingler()
                for record in json.loads(text):
                    per_record(rtype, record, shingler)
            best = min(best, time.process_time() - started)
        return best

    stages = [
        ("json.loads of every record file", lambda t, r, s: None),
        ("+ the knowledge fields (knowledge_units)", lambda t, r, s: aml.knowledge_units(t, r)),
        ("+ field-tagged 3-gram shingles", lambda t, r, s: s.shingles(aml.knowledge_units(t, r))),
        ("+ MinHash band keys", lambda t, r, s: aml.minhash_bands(
            s.shingles(aml.knowledge_units(t, r)))),
        ("least shingler: top-level strings, 3-grams, one sketch",
         lambda t, r, s: _least_shingles(r))]
    parse = None
    lines = ["| stage (cumulative, CPU, best of 3) | seconds | x parse |", "|---|---|---|"]
    for label, per_record in stages:
        seconds = run(per_record)
        parse = parse or seconds
        lines.append("| %s | %.2f s | %.2fx |" % (label, seconds, seconds / parse))
    return lines


def machine() -> str:
    """The CPU, its core count and the load when the run started (a shared machine's
    neighbours slow every figure; the ratios are of CPU seconds measured in one run)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return "machine: %s, %d cores, load average %.2f %.2f %.2f at the start" % (
        (model, os.cpu_count() or 0) + os.getloadavg())


def main(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=20, help="store size in MiB (default 20)")
    parser.add_argument("--small", type=float, default=5,
                        help="a second, smaller size for the linearity check (default 5; "
                        "0: none)")
    parser.add_argument("--encoding", choices=("mixed", "gzip", "plain"), default="mixed",
                        help="record files gzip, plain or every other agent gzip (default)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=40,
                        help="hard-negative pairs per class and type (default 40)")
    parser.add_argument("--threshold", type=float, default=aml.OptimizeConfig().dedupe_threshold)
    parser.add_argument("--scratch", type=Path, default=None)
    opts = parser.parse_args(argv)
    scratch = Path(opts.scratch or tempfile.mkdtemp(prefix="bench-dedupe-"))
    try:
        big, small, hard_root = scratch / "store", scratch / "small", scratch / "hard"
        plants = generate_with_plants(big, opts.size, opts.seed, opts.encoding)
        if opts.small:
            bench_aml.generate_store(small, opts.small, seed=opts.seed, encoding=opts.encoding)
        hard = build_hard_negatives(big, hard_root, opts.per_class, opts.seed)
        print("$ python3 bench_dedupe.py %s" % " ".join(sys.argv[1:]))
        print("threshold %.2f; encoding %s; %s; Python %s" % (
            opts.threshold, opts.encoding, time.strftime("%Y-%m-%d"), sys.version.split()[0]))
        print(machine())
        print()
        print("\n".join(quality(big, plants, hard_root, hard, opts.threshold)))
        print()
        print("\n".join(speed_lines(([speed(small, opts.threshold)] if opts.small else [])
                                    + [speed(big, opts.threshold)])))
        print()
        print("\n".join(stage_costs(big)))
        print("load average after: %.2f %.2f %.2f" % os.getloadavg())
    finally:
        if opts.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
