"""The configuration schema of fla_ds: one dataclass per pipeline step, field by field with
its default and where a published setting comes from. Loading, overrides and validation live
in ``fla_ds/config.py``, which re-exports everything here (import from there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Optimizer(Enum):
    """``train.optimizer``."""

    sgd = "sgd"
    adamw = "adamw"


class Precision(Enum):
    """``train.precision``: auto is bf16 on a GPU, fp32 on a CPU (fp16 is refused on CPU)."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class Level(Enum):
    """``eval.level``: score words, or characters (CSL-Daily)."""

    word = "word"
    char = "char"


@dataclass
class CorpusConfig:
    name: str = "manifest"
    """Reader: phoenix14t, csl-daily, how2sign, manifest or synthetic."""
    root: str = ""
    """The corpus as its release lays it out on disk (for manifest: the manifest file)."""
    split: str = "train"
    """train, dev or test (How2Sign's 'val' is accepted as dev)."""
    how2sign_clips: str = "clips"
    """How2Sign: folder of pre-cut <SENTENCE_NAME>.mp4 clips, relative to root."""
    how2sign_raw_videos: str = ""
    """How2Sign: folder of raw <VIDEO_NAME>.mp4 videos to cut by the re-aligned times."""
    language: str = ""
    """ISO 639-1 code of the texts (e.g. de, en, zh, fr); empty: the corpus's own (phoenix14t de,
    csl-daily zh, how2sign en, synthetic de). Recorded in the shard index: stage 2's default
    prompt follows it. An own (manifest) corpus should name it."""


@dataclass
class ShardsConfig:
    out: str = "shards"
    """Output folder for <split>-%06d.tar, index.json, rejects.jsonl."""
    samples_per_shard: int = 64
    """Input samples per shard (rejected ones leave a shard a little short)."""
    short_side: int = 256
    """Frames are resized so their short side has this many pixels (256 keeps 224 crops)."""
    jpeg_quality: int = 90
    """Per-frame JPEG quality (docs/benchmarks.md says why per-frame JPEG)."""
    workers: int = 1
    """Processes encoding shards in parallel; the output bytes do not depend on it."""
    order_seed: int | None = 0
    """Samples are put in a seeded random order before sharding so that one shard mixes
    signers and days; null keeps the corpus order."""
    max_frames: int = 0
    """Drop clips longer than this many frames (0: no limit)."""
    first_shard: int = 0
    num_shards: int = 0
    """With either set, build only shards first_shard .. first_shard+num_shards-1 (0: to the
    end) and no index: Slurm job arrays split a build this way. A run without a range builds
    what is missing and writes the index."""


class Decode(Enum):
    """``stream.decode``: where a video batch's JPEGs are decoded."""

    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


@dataclass
class StreamConfig:
    """The loader (fla_ds/stream.py): which shards, how many worker processes, the seed. The
    micro batch is ``train.micro_batch``; what is done to each clip is the ``augment`` section."""

    shards: str = "shards"
    """Folder with index.json and the tar shards."""
    split: str = "train"
    num_workers: int = 2
    """DataLoader worker processes per rank. How many a GPU needs: docs/cluster.md, "Workers
    and CPUs per GPU" (workers = ceil(clips/s the GPU takes / clips/s one worker decodes),
    each worker a CPU core besides the rank's own)."""
    decode: Decode = Decode.auto
    """cpu: the workers decode (libjpeg-turbo through simplejpeg, PIL for what it cannot read
    exactly). gpu: the workers ship the kept frames' JPEG bytes and the training process decodes
    them on its device (torchvision's nvJPEG; untested on a GPU until `fla-ds bench gpu` runs on
    one). auto: gpu where a CUDA device and torchvision's nvJPEG are there, else cpu."""
    persistent_workers: bool = True
    """Workers live as long as the loader (started once, not every epoch); false restarts them
    every pass. Batches are the same either way."""
    seed: int = 0
    """Shuffling is seeded by (seed, epoch), identical on every rank."""
    train: bool = True
    """Training: random temporal/spatial augmentation, drop the remainder so every rank gets
    the same number of full batches. Evaluation: uniform sampling, center crop, every sample
    exactly once (ranks are padded with samples marked valid=False)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""


@dataclass
class AugmentConfig:
    """What turns a stored clip into the model's input (fla_ds/augment.py, one ``Augment``
    object): frame sampling, crops, the training warp. Stage 2 and feature caches take this
    section from the stage-1 checkpoint they use; its hash is the feature cache's fingerprint."""

    keep_ratio: float = 0.25
    """Fraction of frames kept (the paper's T/4)."""
    stride_jitter: float = 0.5
    """Training: each kept frame moves by up to this fraction of the stride."""
    max_frames: int = 300
    """Cap on frames per clip after temporal sampling."""
    crop_size: int = 224
    """Side of the frames the model sees, in pixels."""
    crop_fraction: float = 0.875
    """Side of the evaluation centre crop as a fraction of the frame's short side (224/256);
    training crops are scaled around it."""
    crop_scale_min: float = 0.8
    """Training random resized crop: smallest area fraction kept."""
    max_rotation: float = 5.0
    """Training: largest rotation in degrees."""


@dataclass
class SynthConfig:
    out: str = "synth"
    """Output folder of the generated corpus (manifest layout)."""
    vocab_size: int = 72
    """At most this many words of PHOENIX-2014T's training sentences (72 gives 112 whole
    sentences; up to 96); each word gets its own motion."""
    train: int = 240
    dev: int = 40
    test: int = 40
    size: int = 64
    """Video width and height in pixels."""
    fps: int = 25
    frames_per_sign: int = 12
    """Mean frames per sign; the signer's speed varies it (12 keeps >= 2 frames of every
    sign after T/4 sampling)."""
    seed: int = 0
    sentences: str = ""
    """CSV of sentences in PHOENIX format; empty uses the copy shipped in the package."""


@dataclass
class BenchConfig:
    clips: int = 24
    """Clips measured in each part of `fla-ds bench data`."""
    frames: int = 116
    """Frames per clip (PHOENIX-2014T's mean is 116.6)."""
    height: int = 260
    width: int = 210
    workers: int = 2
    out: str = ""
    """Scratch folder; empty uses a temporary one. `fla-ds bench gpu`: the JSON file it writes
    (empty: bench-gpu.json in the current folder)."""
    raw_seconds: float = 240.0
    """`fla-ds bench ingest`: length of the long raw video cut at its start, middle and end."""
    raw_keyint_s: float = 2.0
    """`fla-ds bench ingest`: keyframe interval of that video, seconds."""
    hd_seconds: float = 20.0
    """`fla-ds bench ingest`: length of the 1280x720 clip whose build memory is measured."""
    budget_s: float = 540.0
    """`fla-ds bench gpu`: its own time limit in seconds; it stops between measurements and
    lists what it did not reach as skipped (540 keeps one call under 10 minutes)."""
    tiny: bool = False
    """`fla-ds bench gpu`: the same code with tiny shapes on the CPU, fp32, in under a minute
    (what the test suite runs)."""
    stage1_config: str = "phoenix14t_stage1"
    """`fla-ds bench gpu`: the stage-1 config benched (a shipped name or a file)."""
    stage2_config: str = "phoenix14t_llama7b_qlora"
    """`fla-ds bench gpu`: the stage-2 config benched (its LoRA, optimizer, precision, lengths;
    the model is random with LLaMA-2-7B's shapes)."""
    stage1_micro_batches: list[int] = field(default_factory=lambda: [1, 4, 8])
    """`fla-ds bench gpu`: stage-1 micro batches measured; then doubling to the largest that fits."""
    max_micro_batch: int = 512
    """`fla-ds bench gpu`: where the doubling stops if memory does not."""
    stage2_micro_batches: list[int] = field(default_factory=lambda: [1, 4, 16])
    """`fla-ds bench gpu`: stage-2 micro batches measured (per ZeRO stage, checkpointing on/off,
    feature cache and video)."""
    target_tokens: int = 30
    """`fla-ds bench gpu`: target tokens per stage-2 sample (PHOENIX-2014T: about 14 words, about
    30 tokens of a LLaMA-type tokenizer)."""
    warmup_steps: int = 2
    """`fla-ds bench gpu`: untimed steps before each measurement."""
    timed_steps: int = 5
    """`fla-ds bench gpu`: timed steps per measurement (median, min and max reported)."""
    peak_tflops: float = 0.0
    """`fla-ds bench gpu`: the device's peak dense bf16 TFLOP/s for model-FLOPs utilisation;
    0: from the table in fla_ds/bench/gpu.py by device name."""


@dataclass
class VisualConfig:
    """Stage 1's visual encoder: ResNet-18 per frame, then one temporal block."""

    out_dim: int = 1024
    """Temporal block output size (the authors' earlier GFSLT-VLP code uses 1024)."""
    temporal_kernel: int = 5
    pretrained: str = ""
    """A torchvision-format ResNet-18 ImageNet checkpoint (.safetensors or .pth); empty: random."""
    channels_last: bool | None = None
    """Frames enter the ResNet-18 in channels-last memory layout (what cuDNN's convolutions run
    fastest on tensor cores); null: on where CUDA is, off on a CPU. Same outputs either way
    (within float rounding: tests/test_hot_paths.py)."""


@dataclass
class LightTConfig:
    """Stage 1's lightweight translation transformer (paper: 3+3 layers, 8 heads, d 512)."""

    d_model: int = 512
    heads: int = 8
    encoder_layers: int = 3
    decoder_layers: int = 3
    ffn: int = 2048
    dropout: float = 0.1
    adapter_hidden: int = 1024
    label_smoothing: float = 0.2
    max_target_tokens: int = 64
    """Target tokens per sentence (BOS and EOS included); longer ones are cut."""


@dataclass
class TrainConfig:
    """The training loop shared by both stages."""

    out: str = "runs/stage1"
    """Run folder: step-N/ checkpoints, latest, best, metrics.jsonl, config.yaml."""
    epochs: int = 75
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs)."""
    micro_batch: int = 8
    """Samples per rank per forward/backward pass (DeepSpeed's train_micro_batch_size_per_gpu)."""
    global_batch: int = 8
    """Samples per optimizer step over all ranks; accumulation = global / (micro x ranks)."""
    optimizer: Optimizer = Optimizer.sgd
    """sgd (momentum) or adamw."""
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    """Cosine decay ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    precision: Precision = Precision.auto
    """auto (bf16 on GPU, fp32 on CPU), fp32 or bf16."""
    gradient_checkpointing: bool = False
    ds_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON; its "auto" values are filled from this config."""
    seed: int = 0
    deterministic: bool = False
    """Deterministic algorithms and per-rank seeds, for exact resume comparisons."""
    log_every: int = 10
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "console"])
    """Where metrics go, from rank 0 (fla_ds/loggers.py): jsonl (RUN/metrics.jsonl), console (a
    progress bar on a terminal, plain lines otherwise), tensorboard (RUN/tensorboard), wandb
    (offline unless WANDB_MODE is set: RUN/wandb), mlflow (MLFLOW_TRACKING_URI, else the file
    store RUN/mlruns). The last three need `pip install 'fla-ds[tracking]'`; wandb and mlflow keep
    one run per training run across resumes (ids in RUN/trackers.json)."""
    project: str = "fla-ds"
    """The wandb project and MLflow experiment of the run (a tracker run is named after train.out)."""
    save_every: int = 0
    """Also checkpoint every N optimizer steps (0: only at epoch ends, ``save_every_epochs``)."""
    save_every_epochs: int = 1
    """Checkpoint at the end of every N-th epoch (0: none but the last). The last epoch (or the
    step budget) always saves, so does an evaluation that finds a new best (RUN/best names a
    checkpoint of the weights it scored), and a stop signal always saves where it stops."""
    eval_every_epochs: int = 1
    """Evaluate on dev at the end of every N-th epoch (0: only after the last). The last epoch
    (or the step budget) always evaluates; ``eval.every_steps`` adds step-based evaluations."""
    stop_check_every: int = 10
    """Ranks agree on a stop signal (SIGTERM, SIGUSR1, Ctrl-C) every N optimizer steps, at an
    epoch's last step and before every evaluation batch: one all_reduce of a flag in host memory
    (a gloo group of its own), so the device is never waited on. Bound: a signal is acted on
    within N optimizer steps, then one save; keep N x the step time well inside what the
    launcher allows between its signal and SIGKILL (slurm/*.sh ask for SIGUSR1 300 s ahead;
    torchrun kills 30 s after forwarding SIGTERM). Values below 1 mean 1."""
    compile: bool = False
    """torch.compile the trained module (DeepSpeed's ``engine.compile``): faster steps on a GPU
    once compiled, minutes of compilation first (about 5 min for the tiny test model on a 2-core
    CPU with the inductor backend, when its cache is cold)."""
    compile_backend: str = "inductor"
    """The torch.compile backend; aot_eager captures and checks the same graphs without
    generating code (what the CPU test uses)."""
    keep_last: int = 3
    """Checkpoints kept besides the best."""
    best_metric: str = "bleu4"
    """The dev score (eval section) that picks RUN/best, higher is better: bleu1..bleu4,
    bleu_13a or rouge_l (fla_ds/evaluate/metrics.py: SCORES)."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in out; none; or a step folder."""
    verify_checkpoints: bool = True
    """Check sizes and sha256 of a checkpoint's files before resuming from it."""
    vocab: str = ""
    """Trimmed vocabulary (vocab.json from `fla-ds vocab`); built from the train shards when empty."""
    tokenizer: str = ""
    """The stage-2 language model's tokenizer folder; empty: the embedded SmolLM2."""


@dataclass
class Stage2Config:
    """Stage 2: the frozen stage-1 encoder, a new projector, and a pre-trained language model."""

    encoder: str = ""
    """The stage-1 checkpoint (a step-N folder, or a run folder: its best) whose encoder is used."""
    features: str = ""
    """A feature cache from `fla-ds features extract` to train from instead of video (the
    encoder is frozen, so its output can be computed once)."""
    backend: str = "decoder_only"
    """The language model's backend (registry: fla_ds/backends.py): decoder_only (LLaMA family,
    QLoRA), mbart (encoder-decoder, the paper's) or t5 (T5/mT5 encoder-decoder, as Uni-Sign and
    SpaMo)."""
    model: str = ""
    """Local Hugging Face folder of the language model (its kind must fit the backend);
    empty: the embedded SmolLM2-135M (decoder_only)."""
    qlora: bool = True
    """decoder_only: 4-bit NF4 base (double quantisation) with LoRA adapters."""
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch's input (QLoRA's 0.05). 0 turns it off (peft then uses no
    dropout module): each adapted linear layer no longer keeps a dropped copy of its input for
    the backward pass. Measured on CPU without gradient checkpointing: the tensors saved for
    backward fall by 28% (SmolLM2-135M in NF4 QLoRA, bf16, 2 x 128 tokens: 382 -> 276 MiB; the
    tests' 2-layer LLaMA: 27%, tests/test_hot_paths.py)."""
    lora_targets: str = "all-linear"
    prompt: str = ""
    """decoder_only: text after the visual tokens; empty: the default prompt in the language
    the training shards record (fla_ds/stage2.py: PROMPTS; de, en, zh)."""
    projector_hidden: int = 0
    """Hidden size of the projector MLP (0: the language model's)."""
    projector_lr: float = 1e-3
    """The projector's own learning rate (train.lr is the language model's)."""
    tgt_lang: str = ""
    """mbart: the target language code the decoder starts from (mBART-cc25: de_DE, zh_CN, en_XX)."""
    label_smoothing: float = 0.2
    """mbart, t5: label smoothing of the loss (the paper's 0.2)."""
    max_target_tokens: int = 64
    """Target tokens per sentence (EOS included); longer ones are cut."""


@dataclass
class EvalConfig:
    """Evaluation during training and by ``fla-ds evaluate``: what is decoded, how, and how it
    is scored (the convention is written next to every score)."""

    split: str = "dev"
    every_steps: int = 0
    """Evaluate every N optimizer steps (0: at the end of every epoch)."""
    limit: int = 0
    """Evaluate the first N samples only (0: all)."""
    beam_size: int = 5
    max_new_tokens: int = 0
    """Tokens generated at most (0: the model's max_target_tokens)."""
    level: Level = Level.word
    """word, or char (CSL-Daily: scored per character)."""
    phoenix_period: bool = False
    """Append ' .' to hypotheses and references (as some PHOENIX codebases do)."""
    zero3_copy: bool = True
    """Under ZeRO-3, training's dev decoding runs on an unpartitioned copy of the model: no
    weight gathers per generated token, no rank waiting on another, but the whole model once
    more on every GPU (stage 2 QLoRA 7B: about 4 GiB, docs/memory.md). false: generate on the partitioned model
    (``synced_gpus`` with several ranks), for a model that does not fit a GPU twice. Stage 1
    always decodes a copy (small; its beam search has no synchronised mode)."""


@dataclass
class DemoConfig:
    out: str = "demo-out"
    """Everything the demo makes goes under this folder (synth/, shards/, ...)."""
    epochs: int = 1
    """Epochs of batches streamed to show the loader's throughput."""
    final_beam: int = 5
    """Beam size of the final dev evaluations (training evaluations use eval.beam_size)."""
    stage2_epochs: int = 4
    """Stage-2 epochs (SmolLM2 in QLoRA from the feature cache)."""
    stage2_lr: float = 2.0e-4
    """Stage-2 LoRA learning rate (the projector's is stage2.projector_lr)."""


@dataclass
class Config:
    demo: DemoConfig = field(default_factory=DemoConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)
    light_t: LightTConfig = field(default_factory=LightTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
