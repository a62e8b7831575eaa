"""Frame folders (fla_ds.frame_folder): which files are frames, their order, and the exact RGB
values that come out of every image mode, from real image files written with PIL."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fla_ds.config import load_config
from fla_ds.corpus.base import FrameFolder
from fla_ds.frame_folder import folder_frames, list_frame_files, to_rgb
from fla_ds.frames import SampleError
from fla_ds.shards import build_shards, iter_raw_samples, parse_sample

PHOENIX_FRAMES = Path("PHOENIX-2014-T-release-v3/PHOENIX-2014-T/features/fullFrame-210x260px")
# The start of a real AppleDouble file (what macOS writes as ._name beside every file it copies
# to a filesystem without resource forks): magic 0x00051607, version 2, filler, entries.
APPLEDOUBLE = bytes.fromhex("00051607 00020000") + b"Mac OS X        " + bytes.fromhex("0002 00000009 00000032 00000e") + bytes(64)


def frames_of(folder: Path, pattern: str = "*", short_side: int = 0) -> tuple[list[np.ndarray], Counter]:
    repaired: Counter = Counter()
    return list(folder_frames(FrameFolder(str(folder), pattern), short_side, repaired)), repaired


def solid(mode: str, colour, size=(6, 4)) -> Image.Image:
    return Image.new(mode, size, colour)


# ---------------------------------------------------------------- which files are frames


def add_mac_and_windows_litter(folder: Path) -> None:
    for frame in sorted(folder.iterdir()):
        (folder / f"._{frame.name}").write_bytes(APPLEDOUBLE)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))
    (folder / "Thumbs.db").write_bytes(bytes(64))
    (folder / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (folder / "__MACOSX").mkdir()
    (folder / "__MACOSX" / "._images0001.png").write_bytes(APPLEDOUBLE)


def test_hidden_and_system_files_are_not_frames(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)], start=1):
        solid("RGB", colour).save(folder / f"images{i:04d}.png")
    add_mac_and_windows_litter(folder)
    assert [p.name for p in list_frame_files(FrameFolder(str(folder), "*.png"))] == ["images0001.png", "images0002.png", "images0003.png"]
    frames, repaired = frames_of(folder, "*.png")
    assert [tuple(f[0, 0]) for f in frames] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    assert repaired == Counter()


def test_a_mac_copied_phoenix_corpus_keeps_every_video(phoenix_root, tmp_path):
    """The real release sample with ._images000N.png companions beside its real PNG frames."""
    for split in ("train", "dev", "test"):
        for clip in (phoenix_root / PHOENIX_FRAMES / split).iterdir():
            add_mac_and_windows_litter(clip)
    cfg = load_config(None, [f"corpus.root={phoenix_root}", "corpus.name=phoenix14t", "corpus.split=dev", f"shards.out={tmp_path / 'out'}"])
    summary = build_shards(cfg, progress_bar=False)
    assert (summary.index["samples"], summary.index["frames"], summary.index["rejected"]) == (1, 2, 0)


def test_csl_daily_frame_folders_skip_litter_and_match_the_suffix_in_any_case(csl_daily_root):
    folder = next((csl_daily_root / "sentence/frames_512x512").iterdir())
    (folder / "000002.jpg").rename(folder / "000002.JPG")
    (folder / "._000000.jpg").write_bytes(APPLEDOUBLE)
    (folder / "Thumbs.db").write_bytes(bytes(64))
    solid("RGB", (1, 2, 3)).save(folder / "cover.png")  # not *.jpg: not a frame of this corpus
    assert [p.name for p in list_frame_files(FrameFolder(str(folder), "*.jpg"))] == ["000000.jpg", "000001.jpg", "000002.JPG"]


# ---------------------------------------------------------------- order


def test_frames_come_in_natural_order_whatever_the_case_and_zeros(tmp_path):
    expected = ["img0.png", "Img1.png", "img01.png", "img1.png", "img2.png", "IMG3.PNG", "img007.png", "img10.png", "img10b.png"]
    created = ["img10.png", "img2.png", "IMG3.PNG", "img007.png", "img1.png", "img01.png", "Img1.png", "img0.png", "img10b.png"]
    folder = tmp_path / "clip"
    folder.mkdir()
    for name in created:
        solid("L", expected.index(name) * 20).save(folder / name)
    assert [p.name for p in list_frame_files(FrameFolder(str(folder), "*.png"))] == expected
    frames, _ = frames_of(folder, "*.png")
    assert [int(f[0, 0, 0]) for f in frames] == [i * 20 for i in range(len(expected))]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(SampleError, match="^missing frame folder$"):
        frames_of(tmp_path / "nowhere")
    (tmp_path / "litter").mkdir()
    (tmp_path / "litter" / "._images0001.png").write_bytes(APPLEDOUBLE)
    with pytest.raises(SampleError, match="^zero frames$"):
        frames_of(tmp_path / "litter")


# ---------------------------------------------------------------- colour


def sixteen_bit_grey(value: int) -> Image.Image:
    return Image.fromarray(np.full((4, 6), value, np.uint16))


def palette(transparent_index=None) -> Image.Image:
    im = Image.new("P", (6, 4), 0)
    im.putpalette([200, 100, 50, 10, 20, 30] + [0] * 762)
    im.putpixel((5, 3), 1)
    if transparent_index is not None:
        im.info["transparency"] = transparent_index
    return im


# (image, file name, save options, expected RGB at pixel (0, 0))
MODES = {
    "RGB png": (solid("RGB", (10, 20, 30)), "f.png", {}, (10, 20, 30)),
    "grey png": (solid("L", 77), "f.png", {}, (77, 77, 77)),
    "1-bit png white": (solid("1", 1), "f.png", {}, (255, 255, 255)),
    "1-bit bmp black": (solid("1", 0), "f.bmp", {}, (0, 0, 0)),
    "palette png": (palette(), "f.png", {}, (200, 100, 50)),
    "palette bmp": (palette(), "f.bmp", {}, (200, 100, 50)),
    "palette png, index 0 transparent": (palette(), "f.png", {"transparency": 0}, (255, 255, 255)),
    "palette png, other index transparent": (palette(), "f.png", {"transparency": 1}, (200, 100, 50)),
    "RGBA opaque": (solid("RGBA", (10, 20, 30, 255)), "f.png", {}, (10, 20, 30)),
    "RGBA transparent": (solid("RGBA", (10, 20, 30, 0)), "f.png", {}, (255, 255, 255)),
    # alpha 128 over white: 255 * (255 - 128) / 255 = 127 for a 0 channel, 255 for a 255 one
    "RGBA half": (solid("RGBA", (255, 0, 0, 128)), "f.png", {}, (255, 127, 127)),
    "RGBA webp": (solid("RGBA", (0, 0, 255, 0)), "f.webp", {"lossless": True}, (255, 255, 255)),
    "LA opaque": (solid("LA", (100, 255)), "f.png", {}, (100, 100, 100)),
    "LA transparent": (solid("LA", (100, 0)), "f.png", {}, (255, 255, 255)),
    "RGB png, colour key": (solid("RGB", (10, 20, 30)), "f.png", {"transparency": (10, 20, 30)}, (255, 255, 255)),
    "grey png, grey key": (solid("L", 7), "f.png", {"transparency": 7}, (255, 255, 255)),
    "16-bit grey 0x8000": (sixteen_bit_grey(0x8000), "f.png", {}, (128, 128, 128)),
    "16-bit grey 0xFFFF": (sixteen_bit_grey(0xFFFF), "f.png", {}, (255, 255, 255)),
    "16-bit grey 0x01FF": (sixteen_bit_grey(0x01FF), "f.png", {}, (1, 1, 1)),
    "grey jpeg": (solid("L", 90), "f.jpg", {"quality": 100}, (90, 90, 90)),
    # PIL writes CMYK JPEGs the way Photoshop does: inverted, with an Adobe APP14 marker.
    "CMYK jpeg red": (solid("CMYK", (0, 255, 255, 0)), "f.jpg", {"quality": 100}, (255, 0, 0)),
    "CMYK jpeg half black": (solid("CMYK", (0, 0, 0, 128)), "f.jpg", {"quality": 100}, (127, 127, 127)),
}


@pytest.mark.parametrize("name", list(MODES))
def test_every_image_mode_comes_out_as_the_right_rgb(tmp_path, name):
    image, filename, options, expected = MODES[name]
    folder = tmp_path / "clip"
    folder.mkdir()
    image.save(folder / filename, **options)
    if name.startswith("CMYK"):
        with Image.open(folder / filename) as written:
            assert (written.mode, written.info.get("adobe") is not None) == ("CMYK", True)
    [frame], _ = frames_of(folder)
    assert frame.dtype == np.uint8 and frame.shape == (4, 6, 3)
    assert tuple(int(v) for v in frame[0, 0]) == expected
    assert (frame == frame[0, 0]).all() or name.startswith("palette")


def test_sixteen_bit_grey_in_mode_I_is_scaled_like_I16(tmp_path):
    """Older PIL opens 16-bit grey PNGs as mode I; the value scale is the same."""
    sixteen_bit_grey(0x8000).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "I;16"
        as_i = im.convert("I")
    assert np.asarray(to_rgb(as_i, "g.png"))[0, 0].tolist() == [128, 128, 128]


def test_exif_orientation_is_applied(tmp_path):
    """Stored 4 wide x 2 high, left half red; orientation 6 (rotate 90 degrees clockwise to
    show) makes it 2 wide x 4 high with red on top, as any image viewer shows it."""
    pixels = np.zeros((2, 4, 3), np.uint8)
    pixels[:, :2] = (255, 0, 0)
    pixels[:, 2:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    (tmp_path / "clip").mkdir()
    image.save(tmp_path / "clip" / "f.png", exif=exif)
    [frame], _ = frames_of(tmp_path / "clip")
    assert frame.shape == (4, 2, 3)
    assert frame[:2].reshape(-1, 3).tolist() == [[255, 0, 0]] * 4
    assert frame[2:].reshape(-1, 3).tolist() == [[0, 0, 255]] * 4


def test_unusable_images_are_rejected_with_their_name(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    solid("RGB", (1, 2, 3)).save(folder / "images0001.png")
    Image.new("F", (6, 4), 0.5).save(folder / "images0002.png", format="TIFF")  # a float TIFF under a PNG name
    with pytest.raises(SampleError, match=r"^unsupported image mode \(images0002\.png: F\)$"):
        frames_of(folder)
    data = (folder / "images0001.png").read_bytes()
    (folder / "images0002.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(SampleError, match=r"^corrupt image \(images0002\.png\)$"):
        frames_of(folder)
    (folder / "images0002.png").write_bytes(b"not an image at all")
    with pytest.raises(SampleError, match=r"^corrupt image \(images0002\.png\)$"):
        frames_of(folder)


# ---------------------------------------------------------------- size, memory


def test_mixed_frame_sizes_take_the_first_frames_stored_size_and_are_counted_once(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, (size, colour) in enumerate([((40, 30), (200, 0, 0)), ((80, 60), (0, 200, 0)), ((30, 40), (0, 0, 200)), ((40, 30), (9, 9, 9))], 1):
        solid("RGB", colour, size).save(folder / f"images{i:04d}.png")
    frames, repaired = frames_of(folder, short_side=15)
    assert [f.shape for f in frames] == [(15, 20, 3)] * 4
    assert [tuple(int(v) for v in f[7, 10]) for f in frames] == [(200, 0, 0), (0, 200, 0), (0, 0, 200), (9, 9, 9)]
    assert repaired == Counter({"frame_size_mixed": 1})
    same, repaired = frames_of(folder, "images000[14].png", short_side=15)
    assert len(same) == 2 and repaired == Counter()


def test_frames_are_decoded_one_at_a_time(tmp_path):
    """A file is opened only after the frame before it was handed on: rewriting frame 2 after
    frame 1 came out changes what frame 2 is."""
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in (1, 2):
        solid("RGB", (i, i, i)).save(folder / f"images{i:04d}.png")
    frames = folder_frames(FrameFolder(str(folder)), 0, Counter())
    assert next(frames)[0, 0].tolist() == [1, 1, 1]
    solid("RGB", (99, 99, 99)).save(folder / "images0002.png")
    assert next(frames)[0, 0].tolist() == [99, 99, 99]
    assert next(frames, None) is None


def test_a_built_clip_holds_the_converted_frames(tmp_path):
    """Through a real build: a manifest clip of RGBA and 16-bit frames is stored as RGB."""
    folder = tmp_path / "corpus" / "frames" / "clip"
    folder.mkdir(parents=True)
    solid("RGBA", (0, 0, 0, 0), (32, 32)).save(folder / "images0001.png")
    Image.fromarray(np.full((32, 32), 0x8000, np.uint16)).save(folder / "images0002.png")
    (folder / "._images0001.png").write_bytes(APPLEDOUBLE)
    manifest = tmp_path / "corpus" / "train.jsonl"
    manifest.write_text(json.dumps({"id": "c", "frames": "frames/clip", "text": "weiß"}) + "\n", "utf-8")
    out = tmp_path / "out"
    cfg = load_config(None, [f"corpus.root={manifest}", f"shards.out={out}", "shards.short_side=16", "shards.jpeg_quality=95"])
    summary = build_shards(cfg, progress_bar=False)
    assert (summary.index["samples"], summary.index["rejected"]) == (1, 0)
    [raw] = list(iter_raw_samples(str(out / "train-000000.tar")))
    meta, pack = parse_sample("train-000000.tar", raw)
    assert (meta["num_frames"], meta["width"], meta["height"]) == (2, 16, 16)
    white, grey = pack.decode([0, 1])
    assert np.abs(white.astype(int) - 255).max() <= 1 and np.abs(grey.astype(int) - 128).max() <= 1
