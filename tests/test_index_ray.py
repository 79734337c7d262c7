"""galr-index --ray: shard files, refusal of another job's folder, and (slow) a two-node Ray Data run
that loses a worker mid-job, then a resumed run that encodes only what is missing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from galr.errors import InputError
from galr.runtime.index import ImageRecord, build_index
from galr.runtime.index.build import SkippedImage
from galr.runtime.index.distributed import (
    DistributedSettings,
    _job,
    prepare_shard_folder,
    read_shard,
    shard_key,
    write_shard,
)
from tests.ray_cluster import two_node_cluster
from tests.test_runtime_cli import deployment  # noqa: F401  (the shared module fixture)


def test_a_shard_round_trips_and_is_only_accepted_with_its_key(tmp_path):
    records = [ImageRecord("a.png", "/x/a.png", 4, 4), ImageRecord("b.png", "/x/b.png", 4, 4)]
    embeddings = np.eye(2, 8, dtype=np.float32)
    write_shard(tmp_path / "s.npz", "key-1", records, embeddings, [SkippedImage("/x/c.png", "broken")])
    found = read_shard(tmp_path / "s.npz", "key-1")
    assert found is not None and found[0] == records and np.array_equal(found[1], embeddings)
    assert found[2] == [SkippedImage("/x/c.png", "broken")]
    assert read_shard(tmp_path / "s.npz", "key-2") is None  # another job's shard
    (tmp_path / "bad.npz").write_bytes(b"cut short")
    assert read_shard(tmp_path / "bad.npz", "key-1") is None and read_shard(tmp_path / "none.npz", "k") is None


def test_a_shard_folder_of_another_job_is_refused(tmp_path):
    paths = [Path(f"/x/{n}.png") for n in range(5)]
    job = _job("model-a", paths, 2, None, None)
    prepare_shard_folder(tmp_path / "s", job)
    prepare_shard_folder(tmp_path / "s", job)  # the same job resumes
    with pytest.raises(InputError, match="another indexing job.*model_hash"):
        prepare_shard_folder(tmp_path / "s", _job("model-b", paths, 2, None, None))
    with pytest.raises(InputError, match="images"):
        prepare_shard_folder(tmp_path / "s", _job("model-a", paths[:4], 2, None, None))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a shard folder"):
        prepare_shard_folder(tmp_path / "other", job)
    assert shard_key(job, 0) != shard_key(job, 1)


def test_ray_settings_refuse_a_folder_as_address():
    with pytest.raises(InputError, match="HOST:PORT"):
        DistributedSettings(address="images/")


def _images(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for n in range(count):
        path = folder / f"img_{n:03d}.png"
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_two_nodes_lose_a_worker_and_a_resumed_job_encodes_only_the_missing_shards(deployment, tmp_path):  # noqa: F811
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'galr[ray]')")
    psutil = pytest.importorskip("psutil")

    from galr.runtime.index.distributed import build_index_on_ray, shard_path

    images = _images(tmp_path / "images", 24)
    engine = deployment["engine"]
    expected, _ = build_index(engine, images, progress=False, root=tmp_path / "images")
    output = tmp_path / "archive.gidx"
    settings = DistributedSettings(workers=2, cpus_per_worker=0.5, shard_size=4, batch_size=4)
    common = dict(model_hash=engine.model_hash, embed_dim=engine.embed_dim, root=str(tmp_path / "images"),
                  backend="onnxruntime", device="cpu", precision="fp32", log=lambda _: None, progress=False)
    folder = Path(f"{output}.shards")

    killed: list[int] = []

    def kill_a_worker_once_a_shard_is_written() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            if list(folder.glob("shard-*.npz")):
                for process in psutil.process_iter(["pid", "cmdline"]):
                    if (process.info["cmdline"] or [""])[0].startswith("ray::MapWorker"):
                        process.kill()
                        killed.append(process.info["pid"])
                        break
            time.sleep(0.05)

    with two_node_cluster():
        killer = threading.Thread(target=kill_a_worker_once_a_shard_is_written)
        killer.start()
        index, skipped = build_index_on_ray(deployment["bundle"], images, output, settings, **common)
        killer.join()
        assert killed, "no Ray Data worker was found to kill"
        assert index.ids == expected.ids and not skipped  # nothing lost, nothing twice, in order
        np.testing.assert_allclose(index.image_vectors(), expected.image_vectors(), atol=1e-5)
        # a resumed job: drop two shards, keep the others; only the two are encoded again
        kept = {n: shard_path(folder, n).stat().st_mtime_ns for n in range(6)}
        for n in (1, 4):
            shard_path(folder, n).unlink()
        again, _ = build_index_on_ray(deployment["bundle"], images, output, settings, **common)
        assert again.ids == expected.ids
        for n in (0, 2, 3, 5):
            assert shard_path(folder, n).stat().st_mtime_ns == kept[n]  # not encoded twice
        assert all(shard_path(folder, n).exists() for n in (1, 4))


@pytest.mark.slow
def test_galr_index_ray_on_this_machine_builds_the_index_and_removes_its_shards(deployment, tmp_path):  # noqa: F811
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'galr[ray]')")
    from click.testing import CliRunner

    from galr.runtime.cli.index import main
    from galr.runtime.index import load_index

    images = _images(tmp_path / "images", 10)
    output = tmp_path / "x.gidx"
    result = CliRunner().invoke(main, ["--no-progress", str(tmp_path / "images"), "--engine", str(deployment["bundle"]),
                                       "--ray", "--ray-workers", "1", "--ray-worker-cpus", "0.5", "--shard-size", "4",
                                       "-o", str(output), "--backend", "onnxruntime", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "3 shards" in result.output and not Path(f"{output}.shards").exists()
    assert load_index(output).ids == [p.name for p in images]
