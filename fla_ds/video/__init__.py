"""Video files as clips: the frames ffmpeg shows, upright, cut by presentation time.

One reader serves the shard builder, the feature path and ``fla-ds translate``, so that a clip
is the same wherever it is read. It is PyAV (FFmpeg's libraries) used fully: demuxing,
seeking, decoding, edit lists, and scaling with colour conversion in one swscale call from the
decoded YUV (3.4 ms per 720p frame, where PIL's resize of the converted RGB frame took 19.5 ms;
docs/benchmarks.md). Chosen by trying the alternatives on this project's machines: torchcodec
0.17.0 (PyPI) fails to load beside torch 2.13.0+cpu (``OSError: Could not load ...
libtorchcodec_image.so``) and ties the data path to torch's build; decord's last release is
from 2021. PyAV 18 exposes everything the
rules below need: stream dispositions, frame side data (the display matrix), index entries,
seeking, and a reusable swscale context.

What a clip is, rule by rule (README "Building shards" repeats them):

- **Stream.** The video stream ffmpeg picks (the largest picture, counting the default
  stream's as 5,000,000 pixels larger; ties to the first), never an attached picture (cover
  art) nor a still-image track: when
  a file has several video streams, those that deliver at most one packet in their first
  ``STILL_PROBE_PACKETS`` packets are stills. A file with no video stream is rejected.
- **Orientation.** The display matrix (phones store portrait video as landscape pixels plus a
  rotation) is applied as ffmpeg's autorotate does: rotations by multiples of 90 degrees and
  mirrorings, exactly (checked against the ffmpeg CLI for all eight). Other angles are
  rejected rather than guessed.
- **Geometry.** The sample aspect ratio is applied (anamorphic broadcast video is stored with
  non-square pixels), then every frame is resized as it is decoded so that its short side is
  ``short_side``; frames whose coded size changes mid-stream are scaled to the first frame's
  size (counted as ``frame_size_mixed``). Any pixel format FFmpeg decodes (4:2:0, 4:4:4,
  10-bit, full or limited range) is converted by swscale using the frame's colour metadata.
  Interlaced frames are kept as coded (ffmpeg does not deinterlace by default either).
- **Frames and time.** Every frame the decoder outputs, in presentation order, is one frame of
  the clip: edit lists are honoured by libavformat/libavcodec (the pre-roll of a ``-c copy``
  cut is discarded), variable-frame-rate video is not resampled. A frame's time is
  ``(pts - stream start) x time base`` in seconds, the stream start being the stream's
  ``start_time`` (MPEG-TS streams start near 1.4 s, edited MP4s at 0), so annotation times
  count from the first frame shown. A frame is displayed from its time until the next frame's
  time (the last frame: for its own duration, else one frame period).
- **Cuts.** A cut ``[start, end)`` (How2Sign raw videos, manifests' ``start``/``end``) is the
  frames whose display interval lies in ``[start, end)`` (1 microsecond of tolerance). An end
  past the end of the video is clamped and counted (``end_clamped``); a start at or past the
  end is rejected; a cut that holds no whole frame is rejected.
- **Seeking.** A cut that starts later than ``SEEK_AFTER_S`` seconds is reached by seeking to
  the keyframe before it, so at most the cut plus one keyframe interval is decoded. A seek is
  verified: after it, frames before the first keyframe decoded are not trusted (open-GOP
  leading frames reference data before the seek point), and if that keyframe lies after the
  cut's start (MPEG-TS seeks land imprecisely) the reader seeks earlier, and in the end
  decodes from the start. Several cuts of one video are read in one pass, seeking only across
  gaps longer than the keyframe interval seen so far.
- **Damage.** A file whose own index points past its end (a truncated MP4) is rejected as
  ``truncated video`` when the clip needs the missing part; a decoding error is rejected as
  ``undecodable video``; a file FFmpeg cannot open as ``unreadable video``.
"""
from fla_ds.video.cuts import Cut, CutEvent, encode_cuts, encode_video, read_cuts
from fla_ds.video.geometry import Geometry, Orientation
from fla_ds.video.source import ReadStats, VideoSource, pick_video_stream

__all__ = ["Cut", "CutEvent", "Geometry", "Orientation", "ReadStats", "VideoSource", "encode_cuts", "encode_video", "pick_video_stream",
           "read_cuts"]
