"""The stage-1 data path's switches give the same numbers: simplejpeg's pixels are PIL's on real
frames, the loader's batches are the same with persistent workers as without and with JPEG
bytes decoded after the workers (the stream.decode=gpu path, its device call replaced by a CPU
decode) as with pixels from the workers, and only the padded tail of a batch is written with
zeros. Also the workers-per-GPU rule that the Slurm script and the stage-1 configs follow."""
from __future__ import annotations

import io
import os
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus_factory import frames_corpus
from helpers import collect
from PIL import Image

from fla_ds.augment import Augment, device_decoder, video_from_frames
from fla_ds.bench.data import CLIPS_PER_WORKER_CORE, TARGET_CLIPS_PER_GPU, interleaved, workers_per_gpu
from fla_ds.config import load_config
from fla_ds.corpus.base import VideoFile
from fla_ds.frames import (
    FramePack,
    JpegError,
    JpegSizeError,
    cut_clip,
    decode_cuts_into,
    encode_jpeg,
    encode_source,
    force_jpeg_decoder,
    jpeg_header,
    read_jpeg,
)
from fla_ds.shards import build_shards
from fla_ds.shards.format import iter_raw_samples, parse_sample
from fla_ds.stream import ShardStream, clip_from_pack

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def jpeg_of(frame: np.ndarray, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", **options)
    return buf.getvalue()


@pytest.fixture(scope="module")
def real_jpegs() -> list[bytes]:
    """Frame packs of real signing video (How2Sign fixture clips, 1280x720 h264) and real
    PHOENIX frames (210x260 PNG), made by the project's own reader and encoder."""
    jpegs = []
    for video in sorted((FIXTURES / "how2sign" / "clips").glob("*.mp4")):
        clip = encode_source(VideoFile(str(video)), 256, 90)
        pack = FramePack(clip.pack)
        jpegs += [bytes(pack.jpeg(i)) for i in range(len(pack))]
    for png in sorted(FIXTURES.glob("phoenix14t/release-sample/**/*.png")):
        with Image.open(png) as im:
            jpegs.append(encode_jpeg(im.convert("RGB").resize((256, 317), Image.Resampling.BILINEAR), 90))
    assert len(jpegs) > 20
    return jpegs


def test_simplejpeg_decodes_our_frames_to_exactly_pils_pixels(real_jpegs):
    for data in real_jpegs:
        assert jpeg_header(data)[2] == "simplejpeg"
        assert np.array_equal(read_jpeg(data), pil_rgb(data))


@pytest.mark.parametrize("options", [{"progressive": True}, {"subsampling": "4:4:4", "quality": 75}, {"subsampling": "4:2:2", "quality": 50},
                                     {"optimize": True}])
def test_other_encodings_decode_identically_too(real_jpegs, options):
    frame = pil_rgb(real_jpegs[0])
    data = jpeg_of(frame, **options)
    assert jpeg_header(data)[2] == "simplejpeg" and np.array_equal(read_jpeg(data), pil_rgb(data))
    grey = jpeg_of(frame[..., 0])
    assert np.array_equal(read_jpeg(grey), pil_rgb(grey))


def test_cmyk_goes_to_pil_and_a_damaged_jpeg_gets_pils_verdict(real_jpegs):
    frame = pil_rgb(real_jpegs[0])
    buf = io.BytesIO()
    Image.fromarray(frame).convert("CMYK").save(buf, format="JPEG")
    cmyk = buf.getvalue()
    assert jpeg_header(cmyk)[2] == "pil" and np.array_equal(read_jpeg(cmyk), pil_rgb(cmyk))
    with pytest.raises(JpegError, match="truncated"):
        read_jpeg(real_jpegs[0][:-2000])
    with pytest.raises(JpegError):
        read_jpeg(b"not a jpeg at all")


def test_crop_into_a_given_array_and_the_forced_pil_path_agree(real_jpegs):
    data = real_jpegs[0]
    width, height, _ = jpeg_header(data)
    box = (10, 3, 10 + 200, 3 + 200)
    out = np.full((200, 200, 3), 7, dtype=np.uint8)
    assert read_jpeg(data, (width, height), box, out) is out
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(out, np.asarray(im.convert("RGB").crop(box)))
    force_jpeg_decoder("pil")
    try:
        assert jpeg_header(data)[2] == "pil" and np.array_equal(read_jpeg(data, box=box), out)
    finally:
        force_jpeg_decoder(None)
    with pytest.raises(JpegSizeError) as err:
        read_jpeg(data, (width + 1, height))
    assert (err.value.width, err.value.height) == (width, height)
    with pytest.raises(ValueError, match="not inside"):
        read_jpeg(data, box=(0, 0, width + 1, 10))


# ---------------------------------------------------------------- the loader's switches


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("decode")
    manifest = frames_corpus(root / "corpus", 14, min_frames=9, max_frames=21)
    cfg = load_config(None, [f"corpus.root={manifest}", f"shards.out={root / 'shards'}", "shards.samples_per_shard=4", "shards.short_side=32"])
    build_shards(cfg, progress_bar=False)
    return root / "shards"


def stream(shards: Path, *overrides: str, **kwargs) -> ShardStream:
    cfg = load_config(None, [f"stream.shards={shards}", "train.micro_batch=3", "augment.crop_size=28", "augment.keep_ratio=0.3", *overrides])
    return ShardStream.from_config(cfg, 0, 1, **kwargs)


def epochs(s: ShardStream, count: int = 3) -> list:
    out = []
    for epoch in range(count):
        s.set_epoch(epoch)
        out += collect(s)
    return out


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x.epoch, x.step, x.id, x.key, x.text) == (y.epoch, y.step, y.id, y.key, y.text)
        assert torch.equal(x.video, y.video) and torch.equal(x.video_mask, y.video_mask) and torch.equal(x.valid, y.valid)
        assert (x.affine is None and y.affine is None) or torch.equal(x.affine, y.affine)


def child_pids() -> set[int]:
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                pids.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


@pytest.mark.parametrize("train", [True, False])
def test_persistent_workers_give_the_same_batches_epoch_after_epoch(shards, train):
    """(The batch order depends on the worker count, by design: both use 2 workers.)"""
    persistent = stream(shards, "stream.num_workers=2", f"stream.train={train}")
    seen = []
    for epoch in range(3):
        persistent.set_epoch(epoch)
        batches = iter(persistent)
        first = [next(batches)]
        seen.append(child_pids())
        fresh = stream(shards, "stream.num_workers=2", "stream.persistent_workers=false", f"stream.train={train}")
        assert_same_batches(first + list(batches), collect(_at_epoch(fresh, epoch)))
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) >= 2  # the same worker processes every epoch


def _at_epoch(s: ShardStream, epoch: int) -> ShardStream:
    s.set_epoch(epoch)
    return s


def test_an_epoch_left_early_then_the_next_is_as_from_a_fresh_loader(shards):
    s = stream(shards, "stream.num_workers=2")
    s.set_epoch(0)
    assert len(collect(s, limit=1)) == 1  # the workers still hold batches of epoch 0
    s.set_epoch(1)
    assert_same_batches(collect(s), collect(_at_epoch(stream(shards, "stream.num_workers=2"), 1)))


def cpu_decoder(jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
    """What nvJPEG does on the device, on the CPU: uint8 (N,) JPEGs -> uint8 (3, H, W)."""
    return [torch.from_numpy(read_jpeg(j.numpy().tobytes())).permute(2, 0, 1) for j in jpegs]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("train", [True, False])
def test_jpeg_bytes_decoded_after_the_workers_give_the_cpu_loaders_batches(shards, workers, train):
    """The stream.decode=gpu path, all of it but the device call: the workers' JPEG-bytes
    batches, collated through the DataLoader, decoded, cut and padded by video_from_frames,
    then the model input, equal the CPU path's."""
    pixels = collect(stream(shards, f"stream.num_workers={workers}", f"stream.train={train}", "stream.decode=cpu"))
    shipped = collect(stream(shards, f"stream.num_workers={workers}", f"stream.train={train}", decoder=cpu_decoder))
    assert_same_batches(pixels, shipped)
    augment = Augment(load_config(None, ["augment.crop_size=28"]).augment)
    for a, b in zip(pixels, shipped):
        assert torch.equal(augment.model_input(a.video, a.affine), augment.model_input(b.video, b.affine))


def test_a_batch_is_decoded_in_place_with_only_the_padded_tail_zeroed(shards):
    augment = Augment(load_config(None, ["augment.crop_size=28"]).augment)
    tar = sorted(shards.glob("train-*.tar"))[0]
    samples = [parse_sample(str(tar), raw) for raw in iter_raw_samples(str(tar))]
    cuts = [cut_clip(meta, pack, augment, random.Random(k), True) for k, (meta, pack) in enumerate(samples)]
    lengths = [len(c.indices) for c in cuts]
    assert len(set(lengths)) > 1
    out = np.full((len(cuts), max(lengths) + 1, cuts[0].side, cuts[0].side, 3), 0xFF, dtype=np.uint8)
    decode_cuts_into(cuts, out)
    for k, ((meta, pack), n) in enumerate(zip(samples, lengths)):
        clip, _ = clip_from_pack(meta, pack, augment, random.Random(k), True)
        assert np.array_equal(out[k, :n], clip) and not out[k, n:].any()
    frames = cpu_decoder([torch.frombuffer(bytearray(c.pack.jpeg(i)), dtype=torch.uint8) for c in cuts for i in c.indices])
    assert np.array_equal(video_from_frames(frames, lengths, [c.box for c in cuts]).numpy(), out[:, : max(lengths)])
    with pytest.raises(ValueError, match="frames for clips"):
        video_from_frames(frames[1:], lengths, [c.box for c in cuts])


def test_pil_forced_in_the_loader_gives_the_same_batches(shards):
    fast = collect(stream(shards, "stream.num_workers=0"))
    force_jpeg_decoder("pil")
    try:
        slow = collect(stream(shards, "stream.num_workers=0"))
    finally:
        force_jpeg_decoder(None)
    assert_same_batches(fast, slow)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_decode_gpu_without_a_gpu_is_refused_and_auto_falls_back_to_cpu(shards):
    assert device_decoder("cpu") is None and device_decoder("auto") is None
    with pytest.raises(ValueError, match="stream.decode=gpu needs a CUDA device"):
        stream(shards, "stream.decode=gpu")
    assert stream(shards, "stream.decode=auto").decoder is None


# ---------------------------------------------------------------- workers and CPUs per GPU


def sbatch_defaults(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", script.read_text(), re.M))


def test_workers_per_gpu_rule():
    assert workers_per_gpu(400, 150, 16) == 3
    assert workers_per_gpu(400, 150, 3) == 2  # capped: the rank keeps a core
    assert workers_per_gpu(10, 150, 8) == 1
    with pytest.raises(ValueError):
        workers_per_gpu(400, 150, 1)


@pytest.mark.parametrize("config", sorted(p.stem for p in (ROOT / "fla_ds" / "configs").glob("*_stage1.yaml")))
def test_stage1_configs_and_the_slurm_script_follow_the_rule(config):
    """slurm/stage1.sh's CPUs per GPU are each config's workers plus the rank's own core, and
    the workers are what the rule gives for the documented target and measured rate."""
    defaults = sbatch_defaults(ROOT / "slurm" / "stage1.sh")
    assert defaults["ntasks-per-node"] == "1"  # one task per node: its CPUs are shared by the node's ranks
    gpus, cpus = int(defaults["gpus-per-node"]), int(defaults["cpus-per-task"])
    workers = load_config(config).stream.num_workers
    assert cpus == gpus * (workers + 1), (config, workers, cpus, gpus)
    assert workers == workers_per_gpu(TARGET_CLIPS_PER_GPU, CLIPS_PER_WORKER_CORE, cpus // gpus)


def test_interleaved_timing_alternates_the_alternatives():
    calls = []
    times = interleaved({"a": lambda r: calls.append(("a", r)), "b": lambda r: calls.append(("b", r))}, 3)
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert all(len(t) == 3 and all(wall >= 0 for wall, _, _ in t) for t in times.values())


def test_the_slurm_log_says_how_many_workers_the_cpus_allow():
    env = dict(os.environ, SLURM_CPUS_PER_TASK="18", SLURM_GPUS_ON_NODE="2")
    done = subprocess.run(["bash", "-c", f'source "{ROOT}/slurm/common.sh"; fla_ds_loader_note'], env=env, capture_output=True, text=True, check=True)
    assert "18 CPUs for 2 ranks per node: 9 per rank, so up to 8 loader workers" in done.stdout
