"""Self-tests of tests/video_gallery.py: the frame pattern reads back through every transform
a video goes through, and every gallery file is what its GalleryVideo says. Only PyAV (and,
where installed, the ffmpeg command-line tools as an oracle) read the files here; the
project's own reader is not used."""
from __future__ import annotations

import io
import shutil
import subprocess
from fractions import Fraction

import av
import numpy as np
import pytest
from av.video.reformatter import VideoReformatter
from PIL import Image
from video_gallery import (
    COVER_NUMBER,
    DISPLAY_MATRICES,
    GALLERY,
    MAX_NUMBER,
    ORIENTATIONS,
    frame_pattern,
    phone_times,
    read_pattern,
    transform,
    write_edit_list_cut,
    write_video,
)

FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="the ffmpeg command-line tool is not installed")
VIDEO_CASES = [name for name in GALLERY if name != "audio_only"]
# Numbers that set and clear every cell next to every other: all-black, all-white, each single
# bit, and the two checkerboards.
EDGE_NUMBERS = [0, MAX_NUMBER, 0b101010101010, 0b010101010101, *(1 << bit for bit in range(12))]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A function name -> GalleryVideo that writes each gallery case once per module."""
    folder = tmp_path_factory.mktemp("gallery")
    made = {}

    def video(name):
        if name not in made:
            made[name] = GALLERY[name](folder / name)
        return made[name]

    return video


def decoded_pictures(path, index):
    """(pictures as RGB uint8 (H, W, 3), frames) of stream ``index``, decoded by PyAV."""
    with av.open(str(path)) as container:
        frames = list(container.decode(container.streams[index]))
    # One converter for all: frame.to_ndarray(format=...) builds a new one per frame (10x slower).
    reformatter = VideoReformatter()
    return [reformatter.reformat(frame, format="rgb24").to_ndarray() for frame in frames], frames


def jpeg_q75(picture):
    """``picture`` (H, W, 3) after a round trip through JPEG at quality 75 (4:2:0)."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, "JPEG", quality=75)
    return np.array(Image.open(buffer).convert("RGB"))


def resized(picture, short_side=32, stretch=Fraction(1)):
    """``picture`` scaled (bilinear) to ``short_side`` pixels on its short side, its width
    then stretched by ``stretch`` (a sample aspect ratio)."""
    height, width = picture.shape[:2]
    scale = short_side / min(width, height)
    size = (max(1, round(width * scale * stretch)), round(height * scale))
    return np.array(Image.fromarray(picture).resize(size, Image.BILINEAR))


def through_pix_fmt(picture, pix_fmt):
    """``picture`` (H, W, 3) converted by FFmpeg's swscale to ``pix_fmt`` and back to RGB."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
    return frame.reformat(format=pix_fmt).to_ndarray(format="rgb24")


# --- the pattern -------------------------------------------------------------------------


def test_every_number_reads_back_in_every_orientation():
    for number in range(MAX_NUMBER + 1):
        upright = frame_pattern(number, 96, 64)
        for orientation in ORIENTATIONS:
            assert read_pattern(transform(upright, orientation)) == (number, orientation)


@pytest.mark.parametrize("size", [(97, 55), (180, 240), (32, 32), (1920, 1080)])
def test_every_number_reads_back_at_other_sizes(size):
    # Every number, each in one orientation (number % 8), so all eight are met at every size;
    # the full-HD size only every 61st number, to stay fast.
    step = 61 if size[0] > 1000 else 1
    for number in range(0, MAX_NUMBER + 1, step):
        orientation = ORIENTATIONS[number % 8]
        assert read_pattern(transform(frame_pattern(number, *size), orientation)) == (number, orientation)


@pytest.mark.parametrize("size", [(96, 64), (180, 240), (97, 55)])
def test_pattern_survives_jpeg_and_downscaling(size):
    for number in EDGE_NUMBERS:
        upright = frame_pattern(number, *size)
        for orientation in ORIENTATIONS:
            picture = np.ascontiguousarray(transform(upright, orientation))
            assert read_pattern(jpeg_q75(picture)) == (number, orientation)
            for stretch in (Fraction(1), Fraction(16, 15), Fraction(4, 3), Fraction(3, 4)):
                assert read_pattern(resized(picture, 32, stretch)) == (number, orientation), stretch
            assert read_pattern(jpeg_q75(resized(picture, 32, Fraction(16, 15)))) == (number, orientation)


@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv420p10le", "yuv422p10le", "nv12"])
def test_pattern_survives_chroma_subsampling_and_10_bit(pix_fmt):
    for number in EDGE_NUMBERS:
        picture = frame_pattern(number, 96, 64)
        assert read_pattern(through_pix_fmt(picture, pix_fmt)) == (number, "upright")
        assert read_pattern(through_pix_fmt(resized(picture, 32, Fraction(4, 3)), pix_fmt)) == (number, "upright")


def test_frame_pattern_layout():
    picture = frame_pattern(0b100000000001, 96, 64)
    assert picture.shape == (64, 96, 3) and picture.dtype == np.uint8
    # Corner squares (16x11 here) in their colours, the background grey, the first cell
    # (most significant bit, top-left of the grid) white, the second black.
    assert picture[5, 8].tolist() == [255, 0, 0] and picture[5, 88].tolist() == [0, 255, 0]
    assert picture[58, 8].tolist() == [0, 0, 255] and picture[58, 88].tolist() == [255, 255, 0]
    assert picture[32, 4].tolist() == [128, 128, 128]
    assert picture[17, 23].tolist() == [255] * 3 and picture[17, 40].tolist() == [0] * 3


def test_frame_pattern_rejects_bad_arguments():
    with pytest.raises(ValueError, match="12 bits"):
        frame_pattern(MAX_NUMBER + 1, 96, 64)
    with pytest.raises(ValueError, match="12 bits"):
        frame_pattern(-1, 96, 64)
    with pytest.raises(ValueError, match="too small"):
        frame_pattern(0, 8, 64)


def test_read_pattern_rejects_what_is_not_the_pattern():
    grey = np.full((64, 96, 3), 128, np.uint8)
    with pytest.raises(ValueError, match="corner"):
        read_pattern(grey)
    noise = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    with pytest.raises(ValueError):
        read_pattern(noise)
    # Red and green swapped: no rotation or mirror image gives that arrangement.
    swapped = frame_pattern(5, 96, 64)
    swapped[:11, :16], swapped[:11, 80:] = (0, 255, 0), (255, 0, 0)
    with pytest.raises(ValueError, match="no rotation or mirror"):
        read_pattern(swapped)
    # Two frames blended (a reader that mixes frames): cells that differ come out grey.
    blend = ((frame_pattern(0, 96, 64).astype(np.uint16) + frame_pattern(MAX_NUMBER, 96, 64)) // 2).astype(np.uint8)
    with pytest.raises(ValueError, match="neither white nor black"):
        read_pattern(blend)
    with pytest.raises(ValueError, match="RGB uint8"):
        read_pattern(frame_pattern(1, 96, 64).astype(np.float32))
    with pytest.raises(ValueError, match="RGB uint8"):
        read_pattern(frame_pattern(1, 96, 64)[:, :, 0])


# --- the gallery, read by PyAV -------------------------------------------------------------


@pytest.mark.parametrize("name", VIDEO_CASES)
def test_pyav_decodes_the_expected_frames(gallery, name):
    video = gallery(name)
    pictures, frames = decoded_pictures(video.path, video.stream_index)
    readings = [read_pattern(picture) for picture in pictures]
    assert [number for number, _ in readings] == video.frames
    assert {orientation for _, orientation in readings} == {video.stored_orientation}
    assert {(frame.width, frame.height) for frame in frames} == {video.stored_size}
    start = frames[0].pts
    assert [float((frame.pts - start) * frame.time_base) for frame in frames] == pytest.approx(video.times, abs=1e-6)
    with av.open(str(video.path)) as container:
        stream = container.streams[video.stream_index]
        assert stream.type == "video"
        assert float(stream.start_time * stream.time_base) == pytest.approx(video.start_time)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_oriented_files_carry_their_display_matrix(gallery, orientation):
    video = gallery(f"oriented_{orientation}")
    with av.open(str(video.path)) as container:
        frame = next(container.decode(video=0))
    matrices = [np.frombuffer(bytes(data), np.int32).tolist() for data in frame.side_data if "DISPLAYMATRIX" in str(data.type)]
    # The identity is mp4's default matrix: the demuxer reports none.
    assert matrices == ([] if orientation == "upright" else [list(DISPLAY_MATRICES[orientation])])
    assert video.display_size == (64, 96)
    assert read_pattern(transform(frame.to_ndarray(format="rgb24"), orientation)) == (0, "upright")


def test_portrait_phone_is_landscape_stored_and_portrait_shown(gallery):
    video = gallery("portrait_phone")
    assert video.stored_size == (240, 180) and video.display_size == (180, 240)
    with av.open(str(video.path)) as container:
        frame = next(container.decode(video=0))
    assert frame.rotation == -90  # PyAV's sign: counter-clockwise degrees, so a clockwise quarter turn
    assert read_pattern(frame.to_ndarray(format="rgb24")) == (0, "rot90ccw")


@pytest.mark.parametrize("name, declared, shown", [("edit_list_cut", 77, list(range(38, 77))),
                                                   ("edit_list_cut_gaps", 53, [*range(38, 51), 52, 54])])
def test_edit_list_cut_declares_more_frames_than_it_shows(gallery, name, declared, shown):
    video = gallery(name)
    assert video.frames == shown
    with av.open(str(video.path)) as container:
        stream = container.streams.video[0]
        decoded = sum(1 for _ in container.decode(stream))
        assert stream.frames == declared
    assert decoded == len(shown) < declared
    assert video.start_time == 0.0


@pytest.mark.parametrize("name, start", [("late_start_ts", 10.0), ("late_start_mkv", 10.0), ("late_start_mp4", 10.0),
                                         ("ts_muxdelay", 1.48)])
def test_late_streams_report_their_start_time(gallery, name, start):
    video = gallery(name)
    with av.open(str(video.path)) as container:
        stream = container.streams.video[0]
        assert float(stream.start_time * stream.time_base) == pytest.approx(start)
    assert video.start_time == pytest.approx(start)
    assert video.frames == list(range(30))


@pytest.mark.parametrize("name", ["vfr_mkv", "vfr_mp4"])
def test_vfr_files_keep_their_irregular_times(gallery, name):
    video = gallery(name)
    assert video.times == pytest.approx(phone_times())
    gaps = np.diff(video.times)
    assert gaps.min() < 0.01 and gaps.max() > 0.9  # a burst and a freeze, not a steady rate


@pytest.mark.parametrize("name", ["cover_art_mp4", "cover_art_mkv"])
def test_cover_art_is_an_attached_picture_next_to_the_video(gallery, name):
    video = gallery(name)
    with av.open(str(video.path)) as container:
        art = [s for s in container.streams.video if s.disposition & av.stream.Disposition.attached_pic]
        assert [s.index for s in art] == [1] and video.stream_index == 0
        assert (art[0].width, art[0].height) == (320, 240)
        assert not container.streams.video[0].disposition & av.stream.Disposition.attached_pic
    pictures, _ = decoded_pictures(video.path, 1)
    assert [read_pattern(picture) for picture in pictures] == [(COVER_NUMBER, "upright")]


def test_still_image_is_the_first_and_larger_video_track(gallery):
    video = gallery("still_first")
    with av.open(str(video.path)) as container:
        still, real = container.streams.video
        assert (still.index, still.frames, still.width, still.height) == (0, 1, 320, 240)
        assert (real.index, real.width, real.height) == (video.stream_index, 96, 64)
        assert not still.disposition & av.stream.Disposition.attached_pic
    pictures, _ = decoded_pictures(video.path, 0)
    assert [read_pattern(picture) for picture in pictures] == [(COVER_NUMBER, "upright")]


def test_audio_only_file_has_no_video(gallery):
    video = gallery("audio_only")
    with av.open(str(video.path)) as container:
        assert len(container.streams.video) == 0
        assert len(container.streams.audio) == 1
    assert (video.frames, video.display_size, video.stream_index) == ([], None, None)


@pytest.mark.parametrize("name, pix_fmt, size", [
    ("odd_yuv444p_h264", "yuv444p", (97, 55)), ("odd_yuv420p_ffv1", "yuv420p", (97, 55)),
    ("yuv420p10_h264", "yuv420p10le", (96, 64)), ("yuv420p10_hevc", "yuv420p10le", (96, 64)),
    ("yuv420p10_ffv1", "yuv420p10le", (96, 64)), ("yuv422p10_prores", "yuv422p10le", (96, 64)),
])
def test_pixel_formats_and_sizes_are_as_named(gallery, name, pix_fmt, size):
    video = gallery(name)
    with av.open(str(video.path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.pix_fmt, stream.width, stream.height) == (pix_fmt, *size)
    assert video.display_size == size


def test_interlaced_broadcast_is_anamorphic_mpeg2(gallery):
    video = gallery("interlaced_mpeg2_ts")
    with av.open(str(video.path)) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.name, stream.sample_aspect_ratio) == ("mpeg2video", Fraction(16, 11))
        assert stream.display_aspect_ratio == Fraction(16, 9)
        assert all(frame.interlaced_frame for frame in container.decode(stream))
    assert (video.stored_size, video.display_size) == ((176, 144), (256, 144))


def test_anamorphic_h264_display_size(gallery):
    video = gallery("anamorphic_h264")
    with av.open(str(video.path)) as container:
        assert container.streams.video[0].sample_aspect_ratio == Fraction(4, 3)
    assert video.display_size == (128, 64)


def test_long_video_has_regular_keyframes(gallery):
    video = gallery("long")
    assert len(video.frames) == 240 * 24 and video.frames[4096:4099] == [0, 1, 2]
    with av.open(str(video.path)) as container:
        keyframes = [i for i, packet in enumerate(container.demux(video=0)) if packet.size and packet.is_keyframe]
    assert keyframes == list(range(0, 240 * 24, 48))


def test_write_video_rejects_unordered_times(tmp_path):
    with pytest.raises(ValueError, match="strictly increasing"):
        write_video(tmp_path / "x.mkv", range(3), pts_seconds=[0.0, 0.04, 0.04])


# --- the gallery, shown by the ffmpeg CLI (the oracle; skipped where it is not installed) ---


def ffmpeg_pngs(path, index, folder, map_stream=True):
    """PNG files the ffmpeg CLI makes of stream ``index`` (every frame as decoded: no
    resampling, autorotation on, as by default), sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    mapping = ["-map", f"0:{index}"] if map_stream else []
    subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-i", str(path), *mapping, "-fps_mode", "passthrough",
                    "-enc_time_base", "-1", str(folder / "%06d.png")], check=True, capture_output=True)
    return sorted(folder.glob("*.png"))


@needs_ffmpeg
@pytest.mark.parametrize("name", VIDEO_CASES)
def test_ffmpeg_cli_shows_the_expected_frames(gallery, tmp_path, name):
    video = gallery(name)
    pngs = ffmpeg_pngs(video.path, video.stream_index, tmp_path)
    readings, sizes, aspects = [], set(), set()
    for png in pngs:
        with Image.open(png) as image:
            readings.append(read_pattern(np.array(image.convert("RGB"))))
            sizes.add(image.size)
            aspects.add(image.info.get("aspect", (1, 1)))
    assert [number for number, _ in readings] == video.frames
    assert {orientation for _, orientation in readings} == {"upright"}
    (size,), (aspect,) = sizes, aspects
    if aspect[0] == aspect[1] or 0 in aspect:  # ffmpeg writes 0:0 when the ratio is unknown (square)
        assert size == video.display_size
    else:
        # ffmpeg keeps the stored size and tags the sample aspect ratio (PNG pHYs): the
        # display size is the stored width times it.
        assert size == video.stored_size
        assert video.display_size == (round(size[0] * Fraction(*aspect)), size[1])


@needs_ffmpeg
def test_ffmpeg_cli_finds_no_video_in_the_audio_only_file(gallery, tmp_path):
    video = gallery("audio_only")
    result = subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-i", str(video.path), "-map", "0:v", "-f", "null", "-"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "matches no streams" in result.stderr


@needs_ffmpeg
def test_ffmpeg_cli_picks_the_still_by_default(gallery, tmp_path):
    # Documents the notes: the CLI's automatic selection prefers the video with most pixels.
    video = gallery("still_first")
    pngs = ffmpeg_pngs(video.path, None, tmp_path, map_stream=False)
    assert [read_pattern(np.array(Image.open(png).convert("RGB"))) for png in pngs] == [(COVER_NUMBER, "upright")]


def packet_table(path):
    """(pts, dts, keyframe) of every video packet, as PyAV demuxes them."""
    with av.open(str(path)) as container:
        return [(p.pts, p.dts, p.is_keyframe) for p in container.demux(video=0) if p.size]


@needs_ffmpeg
@pytest.mark.parametrize("start, duration", [(1.5, 1.5), (1.52, 0.5), (2.0, 1.0), (0.3, 2.9)])
def test_edit_list_cut_matches_the_ffmpeg_cli(tmp_path, start, duration):
    source = write_video(tmp_path / "source.mp4", range(100), keyint=50)
    ours = write_edit_list_cut(source, tmp_path / "ours.mp4", start, duration)
    theirs = tmp_path / "theirs.mp4"
    subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-ss", str(start), "-i", str(source.path), "-c", "copy",
                    "-t", str(duration), str(theirs)], check=True)
    assert packet_table(ours.path) == packet_table(theirs)
    pngs = ffmpeg_pngs(theirs, 0, tmp_path / "theirs")
    assert [read_pattern(np.array(Image.open(png).convert("RGB")))[0] for png in pngs] == ours.frames
