"""Benchmark of importing already-tokenized data (not a test): `python bench/prep_import.py [--mb 200] [--quick]`.

For each foreign format it writes a dataset of `--mb` MB-equivalent (mb·2^19 tokens: that many MB as the
uint16 stream cpt-tui trains on), then prints one line per format:
  import  engine.data.pack.prepare_source on it (memory-mapped read, tokenizer/EOS checks, router,
          shards, fsync, manifest): tokens/s and MB/s of foreign bytes
  read    a plain numpy read of the same bytes (np.fromfile of every file, page cache warm as for import)
  copy    read + write the same bytes once, fsynced (what any import must at least do on this disk)
  ratio import/read, import/copy   (the limit is the disk; the page cache is dropped before each measure)
Formats: datatrove (.ds/.index/.metadata), megatron (.bin/.idx, uint16), mds (raw int32 ndarray shards
of 2048-token samples, the layout LLM-Foundry's converter writes), mds-zstd, tokens (parquet written by
pyarrow, list<int32> per document). The datatrove / Megatron / MDS files are written here with numpy
following the byte layouts verified on the owner-library fixtures (tests/fixtures/foreign/README.md);
the readers are the ones the tests check against those fixtures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, EOS = 50000, 0


def _docs(n_tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lens = rng.integers(50, 2000, n_tokens // 1000 + 10)
    lens = lens[: int(np.searchsorted(np.cumsum(lens), n_tokens)) + 1]
    lens[-1] -= int(lens.sum()) - n_tokens
    lens = lens[lens > 0]
    flat = rng.integers(1, VOCAB, int(lens.sum()), dtype=np.uint16)
    ends = np.cumsum(lens)
    flat[ends - 1] = EOS
    return flat, ends


def write_datatrove(d: Path, flat, ends) -> None:
    d.mkdir(parents=True)
    flat.astype("<u2").tofile(d / "000_docs.ds")
    ends.astype("<u8").tofile(d / "000_docs.ds.index")
    (d / "000_docs.ds.metadata").write_text(f"bench-tokenizer|2\n{len(flat)}\n-")


def write_megatron(d: Path, flat, ends) -> None:
    d.mkdir(parents=True)
    flat.astype("<u2").tofile(d / "docs.bin")
    lens = np.diff(np.concatenate([[0], ends])).astype("<i4")
    S = len(lens)
    with open(d / "docs.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + np.uint64(1).tobytes() + bytes([8]) + np.uint64(S).tobytes() + np.uint64(S + 1).tobytes())
        f.write(lens.tobytes())
        f.write((np.concatenate([[0], np.cumsum(lens)[:-1]]) * 2).astype("<i8").tobytes())
        f.write(np.arange(S + 1, dtype="<i8").tobytes())


def write_mds(d: Path, flat, ends, zstd: bool = False, sample: int = 2048, shard_bytes: int = 1 << 26) -> None:
    d.mkdir(parents=True)
    n = len(flat) // sample
    samples = flat[: n * sample].astype("<i4").reshape(n, sample)
    head = bytes([5])  # each sample: u32 size, 0x05 (ndim 1, uint16 shape), u16 shape, int32 values + np.uint16(sample).tobytes()
    per = (shard_bytes - 1024) // (4 + 3 + 4 * sample)
    shards = []
    for k, a in enumerate(range(0, n, per)):
        block = samples[a:a + per]
        m = len(block)
        cfg = {"column_encodings": ["ndarray:int32"], "column_names": ["tokens"], "column_sizes": [None],
               "compression": "zstd" if zstd else None, "format": "mds", "hashes": [], "size_limit": shard_bytes,
               "version": 2}
        cfg_b = json.dumps(cfg, sort_keys=True).encode()
        recsz = 4 + 3 + 4 * sample
        base = 4 + 4 * (m + 1) + len(cfg_b)
        offsets = (base + recsz * np.arange(m + 1)).astype("<u4")
        body = np.empty((m, recsz), np.uint8)
        body[:, :4] = np.frombuffer(np.uint32(3 + 4 * sample).tobytes(), np.uint8)
        body[:, 4:7] = np.frombuffer(head, np.uint8)
        body[:, 7:] = block.view(np.uint8).reshape(m, -1)
        raw = np.uint32(m).tobytes() + offsets.tobytes() + cfg_b + body.tobytes()
        name = f"shard.{k:05d}.mds"
        entry = {**cfg, "samples": m, "raw_data": {"basename": name, "bytes": len(raw), "hashes": {}}, "zip_data": None}
        if zstd:
            import zstandard
            z = zstandard.ZstdCompressor(level=3).compress(raw)
            (d / (name + ".zstd")).write_bytes(z)
            entry["zip_data"] = {"basename": name + ".zstd", "bytes": len(z), "hashes": {}}
        else:
            (d / name).write_bytes(raw)
        shards.append(entry)
    (d / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))


def write_tokens(d: Path, flat, ends) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    d.mkdir(parents=True)
    offsets = np.concatenate([[0], ends]).astype(np.int32)
    arr = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int32)))
    pq.write_table(pa.table({"input_ids": arr}), d / "docs.parquet", row_group_size=20000)


FORMATS = {"datatrove": (write_datatrove, "datatrove"), "megatron": (write_megatron, "megatron"),
           "mds": (write_mds, "mds"), "mds-zstd": (lambda d, f, e: write_mds(d, f, e, zstd=True), "mds"),
           "tokens": (write_tokens, "tokens")}


def _drop_cache(paths) -> None:
    """Evict the files from the page cache (clean pages; no root needed) so reads go to the disk."""
    for f in paths:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_numpy(files: list[Path]) -> float:
    _drop_cache(files)
    t = time.perf_counter()
    for f in files:
        np.fromfile(f, np.uint8)
    return time.perf_counter() - t


def _copy_numpy(files: list[Path], out: Path) -> float:
    """The disk limit of an import: read the bytes and write them once, fsynced."""
    _drop_cache(files)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for i, f in enumerate(files):
        with open(out / f"{i}.bin", "wb") as g:
            np.fromfile(f, np.uint8).tofile(g)
            g.flush()
            os.fsync(g.fileno())
    dt = time.perf_counter() - t
    shutil.rmtree(out)
    return dt


def bench_import(mb: int, formats: list[str], work: Path) -> list[str]:
    from engine.data.pack import prepare_source
    from engine.spec import SourceSpec
    tok = SimpleNamespace(vocab_size=VOCAB, eos_id=EOS, bos_id=None, dtype=np.dtype(np.uint16), name_or_path="bench-tokenizer")
    n_tokens = mb << 19
    flat, ends = _docs(n_tokens)
    lines = []
    for name in formats:
        writer, fmt = FORMATS[name]
        d = work / name
        shutil.rmtree(d, ignore_errors=True)
        writer(d, flat, ends)
        files = [p for p in d.rglob("*") if p.is_file()]
        nbytes = sum(p.stat().st_size for p in files)
        path = d / "docs" if name == "megatron" else d
        for f in files:  # written data must be on disk before the page cache can drop it
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        t_read = _read_numpy(files)
        t_copy = _copy_numpy(files, work / "copy")
        out = work / f"{name}-prepared"
        shutil.rmtree(out, ignore_errors=True)
        _drop_cache(files)
        t = time.perf_counter()
        c = time.process_time()
        man = prepare_source(SourceSpec(path=str(path), format=fmt, val_tokens=1 << 20, keep_boundaries=True),
                             name, tok, out, "bench")
        t_imp, c_imp = time.perf_counter() - t, time.process_time() - c
        toks = man["train"]["tokens"] + man["val"]["tokens"]
        lines.append(f"import {name:<10} {toks / 1e6:7.1f} M tokens  {nbytes / 2**20:6.0f} MB on disk  "
                     f"import {toks / t_imp / 1e6:7.1f} M tok/s ({nbytes / 2**20 / t_imp:6.0f} MB/s, {t_imp:5.2f} s, "
                     f"cpu {c_imp:5.2f} s)  read {nbytes / 2**20 / t_read:6.0f} MB/s ({t_read:5.2f} s)  "
                     f"copy {nbytes / 2**20 / t_copy:6.0f} MB/s  ratio import/read {t_imp / t_read:5.1f}  "
                     f"import/copy {t_imp / t_copy:4.1f}")
        print(lines[-1], flush=True)
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/prep_import.py")
    ap.add_argument("--mb", type=int, default=200, help="MB-equivalent (as the uint16 stream) per format")
    ap.add_argument("--quick", action="store_true", help="20 MB-equivalent")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    a = ap.parse_args(argv)
    work = a.dir or Path(tempfile.mkdtemp(prefix="cpt-import-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench_import(20 if a.quick else a.mb, a.formats.split(","), work)
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
