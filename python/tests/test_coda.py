"""Tests of the `coda` Python package on the embedded default tokenizer and the repo's photos.

The command-line comparison needs the `coda` binary: CODA_CLI names it, else target/release or
target/debug is searched. Without one the test prints a skip, unless CODA_REQUIRE_CLI=1 (CI),
where it fails.
"""

import os
import pickle
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import coda

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = [
    ROOT / "assets/samples/lake.png",
    ROOT / "assets/samples/kite.png",
    ROOT / "assets/photos/cups.jpg",
]
SIZE = 64  # small images keep the suite quick; the default resolution is tested by the CLI


@pytest.fixture(scope="module")
def tok():
    return coda.Tokenizer.from_pretrained("default")


def cli():
    exe = os.environ.get("CODA_CLI")
    candidates = [Path(exe)] if exe else [ROOT / "target/release/coda", ROOT / "target/debug/coda"]
    for c in candidates:
        if c.is_file():
            return c
    if os.environ.get("CODA_REQUIRE_CLI") == "1":
        pytest.fail(f"CODA_REQUIRE_CLI=1 but no coda binary among {candidates}")
    print(f"SKIP: no coda binary among {candidates} (build it with cargo build -p coda-cli)")
    pytest.skip("no coda binary")


def test_properties(tok):
    assert tok.codebook_size == 1024
    assert tok.id_dtype == np.uint16
    assert tok.resolution == 128
    assert tok.scales(128, 128)[-1] == (32, 32)
    assert tok.tokens_per_image(128, 128) == sum(h * w for h, w in tok.scales(128, 128))
    assert tok.config["quantizer"]["codebook_size"] == 1024
    assert re.fullmatch(r"[0-9a-f]{16}", tok.hash)


def test_ids_equal_the_cli_token_file(tok, tmp_path):
    exe = cli()
    out = tmp_path / "t.safetensors"
    subprocess.run(
        [str(exe), "encode", "--size", str(SIZE), "-o", str(out), *map(str, PHOTOS)],
        check=True,
        capture_output=True,
    )
    cli_ids, meta = coda.load_tokens(out)
    assert meta["tokenizer_hash"] == tok.hash
    assert meta["codebook_size"] == 1024
    ids = tok.encode(PHOTOS, size=SIZE)
    assert ids.dtype == np.uint16 and cli_ids.dtype == np.uint16
    assert ids.shape == (3, tok.tokens_per_image(SIZE, SIZE))
    np.testing.assert_array_equal(ids, cli_ids)
    # The same pictures as pixel arrays (prepared like the files), one batch or a list.
    pixels = np.stack([coda.load_image(p, SIZE) for p in PHOTOS])
    np.testing.assert_array_equal(tok.encode(pixels), cli_ids)
    np.testing.assert_array_equal(tok.encode(list(pixels), batch=1), cli_ids)
    # Sampling follows the CLI's rule too (image r with seed + r).
    subprocess.run(
        [str(exe), "encode", "--size", str(SIZE), "--sample", "--seed", "5", "-o", str(out)]
        + list(map(str, PHOTOS)),
        check=True,
        capture_output=True,
    )
    sampled_cli, _ = coda.load_tokens(out)
    sampled = tok.encode(pixels, sample=True, seed=5, batch=2)
    np.testing.assert_array_equal(sampled, sampled_cli)
    assert (sampled != cli_ids).any()
    # Decoding: the CLI's PNGs hold the same pixels.
    decoded = tok.decode(ids)
    subprocess.run(
        [str(exe), "decode", "-o", str(tmp_path / "png"), str(tmp_path / "t.safetensors")],
        check=True,
        capture_output=True,
    )
    # t.safetensors now holds the sampled ids: compare with their decode.
    decoded_sampled = tok.decode(sampled)
    for i, p in enumerate(PHOTOS):
        png = coda.load_image(tmp_path / "png" / (p.stem + ".png"))
        np.testing.assert_array_equal(png, decoded_sampled[i])
    assert decoded.shape == (3, SIZE, SIZE, 3)


def test_decode_round_trip_and_scales(tok, tmp_path):
    pixels = np.stack([coda.load_image(p, SIZE) for p in PHOTOS])
    ids = tok.encode(pixels)
    images = tok.decode(ids)
    assert images.dtype == np.uint8 and images.shape == pixels.shape
    # A reconstruction, not noise: the mean error is small against the 0-255 range.
    err = np.abs(images.astype(np.float32) - pixels).mean()
    assert err < 20, err
    as_float = tok.decode(ids, dtype="float32")
    assert as_float.dtype == np.float32
    np.testing.assert_allclose(as_float, images / 255.0, atol=1e-6)
    maps = tok.encode_scales(pixels)
    assert [m.shape for m in maps] == [(3, h, w) for h, w in tok.scales(SIZE, SIZE)]
    np.testing.assert_array_equal(np.concatenate([m.reshape(3, -1) for m in maps], 1), ids)
    np.testing.assert_array_equal(tok.decode(maps), images)
    np.testing.assert_array_equal(tok.reconstruct(pixels), images)
    # Coarse scales only: a blurrier image, still of the full size.
    coarse = tok.decode(ids, scales=3)
    assert coarse.shape == images.shape and (coarse != images).any()
    # Token files round-trip through save_tokens/load_tokens.
    path = tmp_path / "ids.safetensors"
    coda.save_tokens(
        path,
        ids,
        scales=tok.scales(SIZE, SIZE),
        codebook_size=tok.codebook_size,
        tokenizer_hash=tok.hash,
        sources=[p.name for p in PHOTOS],
    )
    back, meta = coda.load_tokens(path)
    np.testing.assert_array_equal(back, ids)
    assert meta["sources"] == [p.name for p in PHOTOS]
    assert meta["scales"] == tok.scales(SIZE, SIZE)
    # A non-square image needs its size to decode.
    wide = tok.encode(np.zeros((1, 32, 64, 3), np.uint8))
    assert tok.decode(wide, image_size=(32, 64)).shape == (1, 32, 64, 3)
    maps = tok.encode_scales(np.zeros((1, 32, 64, 3), np.uint8))
    assert maps[-1].shape == (1, 8, 16)
    assert tok.decode(maps).shape == (1, 32, 64, 3)


def test_evaluate_matches_the_cli(tok, tmp_path):
    exe = cli()
    out = tmp_path / "eval.json"
    subprocess.run(
        [str(exe), "eval", "--data", *map(str, PHOTOS), "--size", str(SIZE), "--json", str(out)],
        check=True,
        capture_output=True,
    )
    import json

    cli_metrics = json.loads(out.read_text())["metrics"]
    metrics = tok.evaluate(PHOTOS, size=SIZE)["metrics"]
    assert metrics["psnr"] == cli_metrics["psnr"]
    assert metrics["ssim"] == cli_metrics["ssim"]
    assert metrics["codebook"]["usage_all"] == cli_metrics["codebook"]["usage_all"]
    assert 10 < metrics["psnr"]["float"] < 60


def test_token_store_reads_what_coda_tokenize_wrote(tok, tmp_path):
    exe = cli()
    data = tmp_path / "data"
    for i, p in enumerate(PHOTOS):
        d = data / ("a" if i < 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).write_bytes(p.read_bytes())
    (data / "b" / "broken.png").write_bytes(b"not a png")
    store = tmp_path / "store"
    subprocess.run(
        [str(exe), "tokenize", "--data", str(data), "-o", str(store), "--size", str(SIZE),
         "--shard-size", "2", "--flip"],
        check=True,
        capture_output=True,
    )
    ts = coda.TokenStore(store)
    assert len(ts) == 3 and ts.views == ["center", "flip"] and ts.classes == ["a", "b"]
    assert ts.manifest["skipped"][0][0] == "b/broken.png"
    keys = [ts[i][2] for i in range(len(ts))]
    assert keys == sorted(f"{'a' if i < 2 else 'b'}/{p.name}" for i, p in enumerate(PHOTOS))
    for i in range(len(ts)):
        ids, label, key = ts[i]
        assert isinstance(ids, np.memmap) or isinstance(ids.base, np.memmap)
        assert ids.shape == (2, tok.tokens_per_image(SIZE, SIZE)) and ids.dtype == np.uint16
        np.testing.assert_array_equal(ids[0], tok.encode([data / key], size=SIZE)[0])
        flipped = np.ascontiguousarray(coda.load_image(data / key, SIZE)[:, ::-1])
        np.testing.assert_array_equal(ids[1], tok.encode(flipped[None])[0])
        assert label == (0 if key.startswith("a/") else 1)
    assert ts[-1][2] == keys[-1]
    with pytest.raises(IndexError):
        ts[3]
    with pytest.raises(FileNotFoundError):
        coda.TokenStore(tmp_path)


def test_pickle_round_trip(tok):
    pixels = np.stack([coda.load_image(p, SIZE) for p in PHOTOS[:2]])
    ids = tok.encode(pixels)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.hash == tok.hash
    np.testing.assert_array_equal(clone.encode(pixels), ids)
    folder = coda.Tokenizer.from_pretrained(ROOT / "assets/tokenizer", threads=1)
    data = pickle.dumps(folder)
    assert len(data) > 1_000_000, "a folder tokenizer carries its weights"
    clone = pickle.loads(data)
    assert clone.hash == folder.hash == tok.hash
    np.testing.assert_array_equal(clone.encode(pixels), ids)


def test_the_gil_is_released_while_encoding(tok):
    pixels = np.stack([coda.load_image(p, 128) for p in PHOTOS] * 4)  # 12 images at 128 px
    expected = tok.encode(pixels[:3])
    stop = threading.Event()
    ticks = []

    def python_work():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            sum(range(200))

    results = [None, None]

    def encode(i):
        results[i] = tok.encode(pixels)

    counter = threading.Thread(target=python_work)
    counter.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    workers = [threading.Thread(target=encode, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    t1 = time.perf_counter()
    stop.set()
    counter.join()
    for r in results:
        np.testing.assert_array_equal(r[:3], expected)
    during = [t for t in ticks if t0 <= t <= t1]
    gaps = np.diff([t0] + during + [t1])
    print(f"encode of 2x12 images took {t1 - t0:.2f} s; Python thread ran {len(during)} times, "
          f"longest pause {gaps.max() * 1000:.0f} ms")
    assert t1 - t0 > 0.3, "the work is too short to tell"
    # Were the GIL held during a model call, the Python thread would stop for the whole call.
    assert gaps.max() < 0.2 * (t1 - t0), gaps.max()


def test_bad_input_raises_the_right_exception(tok, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        tok.encode(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="3"):
        tok.encode(np.zeros((1, 64, 64, 4), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        tok.encode(np.zeros((0, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        tok.encode([])
    with pytest.raises(ValueError, match="multiple"):
        tok.encode(np.zeros((1, 30, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="precision"):
        tok.encode(np.zeros((1, 64, 64, 3), np.uint8), precision="fp8")
    ids = tok.encode(np.zeros((1, 64, 64, 3), np.uint8)).astype(np.int64)
    ids[0, -1] = tok.codebook_size
    with pytest.raises(ValueError, match="1024"):
        tok.decode(ids)
    ids[0, -1] = -1
    with pytest.raises(ValueError, match="non-negative"):
        tok.decode(ids)
    with pytest.raises(ValueError, match="integers"):
        tok.decode(ids.astype(np.float32))
    with pytest.raises(ValueError, match="square"):
        tok.decode(ids[:, :7])
    with pytest.raises(OSError, match="missing.png"):
        tok.encode([tmp_path / "missing.png"])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(OSError, match="corrupt.jpg"):
        tok.encode([corrupt])
    with pytest.raises(OSError):
        coda.Tokenizer.from_pretrained(tmp_path / "no-such-tokenizer")
    with pytest.raises(ValueError, match="range"):
        coda.save_tokens(
            tmp_path / "x.safetensors",
            np.full((1, tok.tokens_per_image(64, 64)), 5000),
            scales=tok.scales(64, 64),
            codebook_size=1024,
            tokenizer_hash=tok.hash,
        )
    assert not (tmp_path / "x.safetensors").exists()


def test_a_job_above_the_memory_limit_raises_memory_error(tok, monkeypatch):
    # The limit comes from CODA_MAX_MEMORY, read at each call; 256 px needs ~70 MB here.
    monkeypatch.setenv("CODA_MAX_MEMORY", "10M")
    with pytest.raises(MemoryError, match="above the limit of 10 MiB"):
        tok.encode(np.zeros((1, 256, 256, 3), np.uint8))
    monkeypatch.delenv("CODA_MAX_MEMORY")
    assert tok.encode(np.zeros((1, 256, 256, 3), np.uint8)).shape[0] == 1


def test_readme_python_example_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    # The package's examples (blocks that import coda; others show reading files without it).
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "import coda" in b]
    assert blocks, "README.md has no Python example of the package"
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for code in blocks:
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    finally:
        os.chdir(cwd)


def test_ray_data_gives_the_ids_of_coda_tokenize(tok, tmp_path):
    try:
        import ray
    except ImportError:
        if os.environ.get("CODA_REQUIRE_RAY") == "1":
            pytest.fail("CODA_REQUIRE_RAY=1 but ray is not installed")
        print("SKIP: ray is not installed (pip install '.[ray]')")
        pytest.skip("ray not installed")
    from coda.ray import TokenizeBatch

    exe = cli()
    data = tmp_path / "data"
    data.mkdir()
    for p in PHOTOS:
        (data / p.name).write_bytes(p.read_bytes())
    store = tmp_path / "store"
    subprocess.run(
        [str(exe), "tokenize", "--data", str(data), "-o", str(store), "--size", str(SIZE), "--flip"],
        check=True,
        capture_output=True,
    )
    ts = coda.TokenStore(store)
    expected = {ts[i][2]: np.asarray(ts[i][0]) for i in range(len(ts))}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.read_images(str(data), include_paths=True, mode="RGB")
        ds = ds.map_batches(
            TokenizeBatch,
            fn_constructor_kwargs={"size": SIZE, "flip": True, "threads": 1},
            batch_size=2,
            batch_format="numpy",
            concurrency=1,  # one tokenizer actor: the read tasks need the other CPU
        )
        rows = ds.take_all()
        out = tmp_path / "parquet"
        ds.write_parquet(str(out))
        assert list(out.glob("*.parquet"))
    finally:
        ray.shutdown()
    assert len(rows) == len(PHOTOS)
    for r in rows:
        key = Path(r["path"]).name
        np.testing.assert_array_equal(r["ids"], expected[key])
