"""The video reader against a gallery of awkward videos made at test time (tests/video_gallery.py):
every frame's number and orientation are drawn into its pixels, so each test checks exactly
which frames came out, which way up, and at what size, against what the ffmpeg CLI shows."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from video_gallery import GALLERY, read_pattern, write_long_video, write_oriented, write_video

from fla_ds.corpus.base import VideoFile
from fla_ds.frames import SampleError, resized_size
from fla_ds.video import Cut, ReadStats, encode_video, read_cuts

VIDEO_CASES = sorted(name for name in GALLERY if name not in ("audio_only", "long"))


def read(path, start=None, end=None, short_side=0, stats=None) -> tuple[list[np.ndarray], Counter]:
    """The frames of one cut as the reader gives them (before JPEG), and its repairs; raises
    the cut's SampleError."""
    frames: list[np.ndarray] = []
    for event in read_cuts(str(path), [Cut(start, end)], short_side, stats):
        if event.restart:
            frames = []
        elif event.frame is not None:
            frames.append(event.frame)
        elif event.error is not None:
            raise event.error
        else:
            return frames, event.repaired
    raise AssertionError("the cut never ended")


def numbers(frames: list[np.ndarray]) -> list[int]:
    """Frame numbers, after checking that every frame is upright."""
    seen = [read_pattern(f) for f in frames]
    sideways = [o for _, o in seen if o != "upright"]
    assert not sideways, f"frames shown {sideways[0]}"
    return [n for n, _ in seen]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    return lambda name: GALLERY[name](folder / name)


@pytest.mark.parametrize("name", VIDEO_CASES)
def test_every_awkward_video_gives_the_frames_ffmpeg_shows_upright_at_the_displayed_size(gallery, name):
    video = gallery(name)
    frames, repaired = read(video.path)
    assert numbers(frames) == video.frames, video.notes
    assert {f.shape for f in frames} == {(video.display_size[1], video.display_size[0], 3)}
    assert repaired == Counter()


@pytest.mark.parametrize("name", ["portrait_phone", "oriented_transpose", "anamorphic_h264", "interlaced_mpeg2_ts", "odd_yuv444p_h264"])
def test_frames_are_resized_as_displayed(gallery, name):
    video = gallery(name)
    frames, _ = read(video.path, short_side=48)
    width, height = resized_size(*video.display_size, 48)
    assert {f.shape for f in frames} == {(height, width, 3)}
    assert numbers(frames) == video.frames


def test_a_portrait_phone_clip_is_stored_portrait(gallery):
    """The issue's case: 4:3 landscape pixels with a 90-degree display matrix is a portrait clip
    (256 wide, 341 high at short side 256), not a sideways landscape one."""
    frames, _ = read(gallery("portrait_phone").path, short_side=256)
    assert frames[0].shape == (341, 256, 3)
    assert read_pattern(frames[0])[1] == "upright"


def test_an_edit_list_cut_keeps_the_frames_shown_not_the_frames_declared(gallery):
    import av

    video = gallery("edit_list_cut")
    with av.open(str(video.path)) as container:
        declared = container.streams.video[0].frames
    frames, _ = read(video.path)
    assert declared > 1.5 * len(frames), "the gallery file should declare its pre-roll"
    assert numbers(frames) == video.frames and len(frames) == 39


def test_audio_only_and_broken_files_are_rejected_with_a_reason(gallery, tmp_path):
    with pytest.raises(SampleError, match=r"^unreadable video \(no video stream\)"):
        read(gallery("audio_only").path)
    (tmp_path / "text.mp4").write_bytes(b"not a video at all " * 50)
    with pytest.raises(SampleError, match=r"^unreadable video"):
        read(tmp_path / "text.mp4")
    with pytest.raises(SampleError, match=r"^missing video file"):
        read(tmp_path / "absent.mp4")


# ------------------------------------------------------------------ cuts by time


def expected_cut(times: list[float], frames: list[int], start: float, end: float, last_duration: float) -> list[int]:
    """The frames whose display interval [t, next t) lies in [start, end)."""
    ends = times[1:] + [times[-1] + last_duration]
    return [n for t, e, n in zip(times, ends, frames) if t >= start - 1e-6 and e <= end + 1e-6]


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    """Four minutes at 24 fps, a keyframe every 2 s: as MP4 (indexed seeks) and MPEG-TS
    (seeks by bisection, which land imprecisely)."""
    folder = tmp_path_factory.mktemp("long")
    return {ext: write_long_video(folder / f"long.{ext}") for ext in ("mp4", "ts")}


@pytest.mark.parametrize("ext", ["mp4", "ts"])
@pytest.mark.parametrize("start", [0.5, 60.25, 117.0, 236.5])
def test_a_cut_of_a_long_video_is_exact_and_decodes_about_the_cut_only(long_videos, ext, start):
    video = long_videos[ext]
    end = start + 3.0
    stats = ReadStats()
    frames, repaired = read(video.path, start, end, stats=stats)
    times = [i / 24 for i in range(len(video.frames))]
    want = expected_cut(times, video.frames, start, end, 1 / 24)
    assert numbers(frames) == want and len(want) == 72
    keyint = 48
    assert stats.frames_decoded <= 2 * len(want) + keyint, f"decoded {stats.frames_decoded} frames to keep {len(want)}"
    assert repaired == Counter()


def test_cut_boundaries_are_display_intervals(long_videos):
    path = long_videos["mp4"].path
    at = lambda start, end: numbers(read(path, start, end)[0])
    assert at(2.0, 2.5) == list(range(48, 60))  # both ends on frame times: [48/24, 60/24)
    assert at(2.0, 2.5 - 1e-3) == list(range(48, 59))  # frame 59 would be shown past the end
    assert at(2.0 + 1e-3, 2.5) == list(range(49, 60))  # frame 48 starts before the cut
    assert at(2.0 - 5e-7, 2.5 + 5e-7) == list(range(48, 60))  # decimal times within a microsecond


def test_cuts_at_and_past_the_end_of_a_video(long_videos):
    path = long_videos["mp4"].path
    frames, repaired = read(path, 238.0, 245.0)
    assert numbers(frames) == [i % 4096 for i in range(238 * 24, 240 * 24)]
    assert repaired == Counter({"end_clamped": 1})
    with pytest.raises(SampleError, match=r"^clip start past end of video \(start 240\.500 s, video ends at 240\.000 s\)"):
        read(path, 240.5, 242.0)
    with pytest.raises(SampleError, match=r"^zero frames \(the cut \[100\.010, 100\.030\) s holds no whole frame\)"):
        read(path, 100.01, 100.03)


def test_several_cuts_of_one_video_are_read_in_one_pass_like_one_by_one(long_videos):
    path = long_videos["mp4"].path
    cuts = [Cut(150.0, 153.0), Cut(10.0, 12.5), Cut(11.0, 14.0), Cut(12.0, 12.2), Cut(200.0, 260.0), Cut(100.01, 100.03)]
    separately, separate_cost = {}, 0
    for i, cut in enumerate(cuts):
        stats = ReadStats()
        try:
            separately[i] = numbers(read(path, cut.start, cut.end, stats=stats)[0])
        except SampleError as exc:
            separately[i] = str(exc)
        separate_cost += stats.frames_decoded
    stats = ReadStats()
    together: dict[int, list] = {i: [] for i in range(len(cuts))}
    done = Counter()
    for event in read_cuts(path, cuts, 0, stats):
        assert done[event.index] == 0, "frames after a cut's end"
        assert not event.restart, "a file with one clock needs no restart"
        if event.frame is not None:
            together[event.index].append(read_pattern(event.frame)[0])
        else:
            done[event.index] += 1
            if event.error is not None:
                together[event.index] = str(event.error)
    assert done == Counter({i: 1 for i in range(len(cuts))})
    assert together == separately
    assert stats.frames_decoded < separate_cost


def test_a_variable_frame_rate_cut_keeps_the_frames_shown_in_it(gallery):
    video = gallery("vfr_mkv")
    for start, end in [(0.0, 0.5), (0.2, 0.9), (0.5, 3.0)]:
        frames, _ = read(video.path, start, end)
        want = expected_cut(video.times, video.frames, start, end, last_duration=1 / 30)
        assert numbers(frames) == want, (start, end)


@pytest.mark.parametrize("name", ["late_start_ts", "late_start_mkv", "late_start_mp4", "ts_muxdelay"])
def test_cut_times_count_from_the_streams_start(gallery, name):
    video = gallery(name)
    frames, _ = read(video.path, 0.4, 0.8)
    assert numbers(frames) == expected_cut(video.times, video.frames, 0.4, 0.8, 1 / 25) == list(range(10, 20))


def test_a_truncated_file_keeps_cuts_before_the_missing_part_only(tmp_path):
    video = write_video(tmp_path / "whole.mp4", range(250), size=(64, 48), rate=25, keyint=25,
                        container_options={"movflags": "faststart"})
    data = video.path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    frames, _ = read(cut, 0.4, 2.0)
    assert numbers(frames) == list(range(10, 50))
    with pytest.raises(SampleError, match=r"^truncated video"):
        read(cut)
    with pytest.raises(SampleError, match=r"^truncated video"):
        read(cut, 8.0, 9.5)


def test_translate_reads_a_rotated_clip_upright(tmp_path):
    """``fla-ds translate`` goes through the same reader: its clip batch is upright."""
    from fla_ds.config import load_config
    from fla_ds.inference import clip_batch

    video = write_oriented(tmp_path / "square.mp4", "rot90cw", numbers=range(8), display_size=(96, 96))
    cfg = load_config(None, ["augment.keep_ratio=1.0", "augment.crop_fraction=1.0", "shards.short_side=96"])
    batch = clip_batch([str(video.path)], cfg)
    clip = batch.video[0].numpy()
    assert clip.shape == (8, 96, 96, 3)
    assert numbers(list(clip)) == list(range(8))


# ------------------------------------------------------------------ real-world files that were seen to fail


def test_cuts_of_an_mpeg_ts_with_b_frames_and_long_gops_are_exact(tmp_path):
    """What ``ffmpeg ... out.ts`` writes (B-frames, a 4 s GOP, the CLI's 0.7 s mux delay):
    seeks land after the cut, the reader backs off and, in the end, reopens the file rather
    than trusting a seek to its start."""
    video = write_video(tmp_path / "plain.ts", range(250), keyint=100, container_options={"max_delay": "700000"})
    for start, end in [(1.5, 2.5), (3.5, 4.5), (5.0, 6.0), (9.0, 9.9)]:
        frames, _ = read(video.path, start, end)
        assert numbers(frames) == expected_cut(video.times, video.frames, start, end, 1 / 25), (start, end)


def test_a_concatenated_mpeg_ts_keeps_every_frame_and_cuts_its_second_half_right(tmp_path):
    """``cat a.ts a.ts`` (joined camcorder parts, HLS segments): the clock restarts in the
    middle; like ffmpeg, the later frames continue after the earlier ones."""
    part = write_video(tmp_path / "part.ts", range(100), keyint=25)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(part.path.read_bytes() * 2)
    frames, _ = read(joined)
    assert numbers(frames) == list(range(100)) * 2
    # [5, 6) s is the second copy's [1, 2) s; [1.5, 2.5) s is in the first copy
    assert numbers(read(joined, 5.0, 6.0)[0]) == list(range(25, 50))
    assert numbers(read(joined, 1.5, 2.5)[0]) == list(range(38, 62))
    together = {}
    for event in read_cuts(str(joined), [Cut(1.5, 2.5), Cut(5.0, 6.0), Cut(6.5, 7.0)], 0):
        if event.restart:
            together[event.index] = []
        elif event.frame is not None:
            together.setdefault(event.index, []).append(read_pattern(event.frame)[0])
    assert together == {0: list(range(38, 62)), 1: list(range(25, 50)), 2: list(range(63, 75))}


def test_presentation_timestamps_that_go_backwards_use_the_decoding_ones_like_ffmpeg(tmp_path):
    """A raw h264 stream muxed without proper timestamps (``ffmpeg -r 25 -i x.h264 -c copy
    x.mp4``) has presentation times out of order; ffmpeg's best-effort timestamp then follows
    the decoding times, and every frame is shown once, in order."""
    import av

    src = write_video(tmp_path / "b_frames.mp4", range(60), keyint=30)
    faulty = tmp_path / "faulty.mp4"
    with av.open(str(src.path)) as inp, av.open(str(faulty), "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        for packet in inp.demux(stream_in):
            if packet.dts is None:
                continue
            packet.pts = packet.dts  # presentation = decoding order: wrong for every B-frame
            packet.stream = stream_out
            out.mux(packet)
    with av.open(str(faulty)) as container:
        decoded = [read_pattern(f.to_ndarray(format="rgb24"))[0] for f in container.decode(video=0)]
    frames, _ = read(faulty)
    assert numbers(frames) == decoded == [1, 2, 3] + list(range(5, 60))  # what ffmpeg 5.1's CLI shows too
    # and their times are ffmpeg's: `ffmpeg -i faulty.mp4 -ss 0.4 -to 1.2` shows frames 10..29
    assert numbers(read(faulty, 0.4, 1.2)[0]) == list(range(10, 30))


def test_a_raw_elementary_stream_is_read_and_cut(tmp_path):
    video = write_video(tmp_path / "raw.h264", range(100), keyint=25, container_format="h264")
    frames, _ = read(video.path)
    assert numbers(frames) == list(range(100))
    assert numbers(read(video.path, 2.0, 3.0)[0]) == list(range(50, 75))


def test_the_default_video_stream_wins_unless_another_is_far_larger(tmp_path):
    """ffmpeg's choice: pixels, plus 5,000,000 for the default stream."""
    import av

    path = tmp_path / "two.mkv"
    with av.open(str(path), "w") as container:
        small = container.add_stream("libx264", rate=25)
        small.width, small.height, small.pix_fmt = 160, 96, "yuv420p"
        large = container.add_stream("libx264", rate=25)
        large.width, large.height, large.pix_fmt = 320, 192, "yuv420p"
        small.disposition = av.stream.Disposition.default
        large.disposition = av.stream.Disposition(0)
        for i in range(10):
            for stream, offset in ((small, 0), (large, 1000)):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(write_pattern(i + offset, stream)), format="rgb24")
                frame.pts = i
                container.mux(stream.encode(frame))
        for stream in (small, large):
            container.mux(stream.encode(None))
    frames, _ = read(path)
    assert numbers(frames) == list(range(10)) and frames[0].shape == (96, 160, 3)


def write_pattern(number: int, stream) -> np.ndarray:
    from video_gallery import frame_pattern

    return frame_pattern(number, stream.width, stream.height)


def test_a_sample_aspect_ratio_set_in_the_container_only_is_applied(tmp_path):
    """``ffmpeg -i a.mp4 -c copy -aspect 4:3 b.mp4``: the bitstream says nothing, the
    container says 4:5; ffmpeg shows 128x96 square pixels for 160x96 stored."""
    from fractions import Fraction

    import av

    src = write_video(tmp_path / "square.mp4", range(10), size=(160, 96))
    tagged = tmp_path / "tagged.mp4"
    with av.open(str(src.path)) as inp, av.open(str(tagged), "w") as out:
        stream_in = inp.streams.video[0]
        stream_out = out.add_stream_from_template(stream_in)
        stream_out.codec_context.sample_aspect_ratio = Fraction(4, 5)
        for packet in inp.demux(stream_in):
            if packet.dts is not None:
                packet.stream = stream_out
                out.mux(packet)
    frames, _ = read(tagged)
    assert frames[0].shape == (96, 128, 3) and numbers(frames) == list(range(10))


def test_translate_names_the_file_it_cannot_read(tmp_path, gallery):
    from fla_ds.config import load_config
    from fla_ds.inference import clip_batch

    audio = gallery("audio_only").path
    with pytest.raises(SampleError, match=rf"^{audio}: unreadable video \(no video stream\)$"):
        clip_batch([str(audio)], load_config(None, []))
    from fla_ds.cli import _known_errors

    assert SampleError in _known_errors()  # printed as one line, exit 2


def test_frames_too_large_to_store_are_rejected_before_anything_is_written(tmp_path):
    video = write_video(tmp_path / "wide.mp4", range(4), size=(2400, 64))  # a 37.5:1 strip
    with pytest.raises(SampleError, match=r"^frames too large to store \(9600x256; the loader reads at most 8192"):
        encode_video(VideoFile(str(video.path)), 256, 90)
    clip = encode_video(VideoFile(str(video.path)), 64, 90)
    assert (clip.width, clip.height, clip.num_frames) == (2400, 64, 4)
