"""Every knob of the project with its default: the config files in `configs/` start from here.

Defaults reproduce the official AnomalyCLIP recipe (spec section 0); GenCLIP's unknowns carry the
reconstruction's defaults (genclip spec section 11). Any field can be overridden on the command line
(`--config.train.lr=3e-4`).
"""

from __future__ import annotations

import ml_collections

from genclip_jax.prompts import winclip as winclip_prompts


def tiny_backbone() -> ml_collections.ConfigDict:
    """A small random CLIP with the real structure (24 vision layers, DPAM 6..24)."""
    return ml_collections.ConfigDict({
        "embed_dim": 32, "image_resolution": 56, "vision_layers": 24, "vision_width": 64,
        "vision_heads": 4, "vision_patch_size": 14, "context_length": 77, "vocab_size": 49408,
        "text_width": 32, "text_heads": 4, "text_layers": 12,
    })


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "anomalyclip"  # or "genclip"
    c.workdir = ""

    # Frozen CLIP backbone.
    c.model = ml_collections.ConfigDict()
    # HF id or directory, OpenAI .pt or name, .npz of OpenAI-named arrays, or "random" (uses
    # model.random_arch: offline demo and tests).
    c.model.clip = "openai/clip-vit-large-patch14-336"
    c.model.random_arch = tiny_backbone()
    c.model.random_seed = 0
    c.model.npz_prefix = ""
    c.model.vision_heads = 0  # 0: from the checkpoint's config, else width // 64
    c.model.text_heads = 0
    # MLP activation: "auto" (the checkpoint's config or file type; OpenAI: QuickGELU),
    # "quick_gelu" or "gelu" (exact, open_clip's ViT-B-16-plus-240).
    c.model.activation = "auto"
    # "" (any CLIP, inferred from the tensors) or a name of clip.model.ARCHITECTURES that the
    # checkpoint must be (mismatched tensors listed); with model.clip="random", that model.
    c.model.architecture = ""
    c.model.dpam_start = 6  # first 1-indexed block with the V-V path; 0 = off
    c.model.global_mode = "cls_no_ln_post"  # or "clip" (ln_post CLS)
    c.model.compute_dtype = "float32"  # or "bfloat16" for speed
    c.model.image_size = 518

    # Text prompt templates and learnable prompt sizes.
    c.prompts = ml_collections.ConfigDict()
    c.prompts.n_ctx = 12
    c.prompts.deep_depth = 9  # layer 1 via the ctx tokens, layers 2..9 via deep prompts
    c.prompts.deep_length = 4
    c.prompts.init_std = 0.02
    c.prompts.fp16_deep_prompts = True  # the reference rounds deep prompts to float16
    c.prompts.class_word = "object"
    c.prompts.normal_state = "{}"
    c.prompts.abnormal_state = "damaged {}"

    c.anomalyclip = ml_collections.ConfigDict()
    c.anomalyclip.features_list = [24]  # the paper setting (spec section 10.1)
    c.anomalyclip.temperature = 0.07
    c.anomalyclip.local_loss_weight = 4.0
    c.anomalyclip.map_reduce = "sum"
    c.anomalyclip.sigma = 4.0

    # GenCLIP: every unknown of the paper is a field; defaults from the reconstruction
    # (genclip spec section 0 and 11).
    c.genclip = ml_collections.ConfigDict()
    c.genclip.layers = [6, 12, 18, 24]
    c.genclip.state_len = 12  # K: individually learnable normal (N_p) / abnormal (A_p) tokens
    c.genclip.gqp_len = 12  # M: shared general query prompt tokens (Q_P)
    c.genclip.init_std = 0.02
    c.genclip.use_mvp = True  # False: no MVP parameters (GQP-only ablation)
    c.genclip.mvp_source = "vanilla"  # stream averaged for the MVPs: "vanilla" or "vv"
    c.genclip.mvp_init = "torch_default"  # or "zeros" (start from the query-only prompt)
    c.genclip.mvp_bias = True
    c.genclip.mvp_target = "all"  # add the MVP token to "all" GQP tokens or the "first"
    c.genclip.normal_state = "{}"
    c.genclip.abnormal_state = "damaged {}"
    c.genclip.deep_depth = 0  # > 1: AnomalyCLIP-style deep text prompts (overwrite rows 1..)
    c.genclip.deep_length = 4
    c.genclip.fp16_deep_prompts = False
    c.genclip.temperature = 0.07
    c.genclip.image_loss_weight = 1.0  # CE on the global feature; 0 drops the image term
    c.genclip.image_text_layer = "last"  # T_vis of the "last" layer or the "mean" over layers
    c.genclip.query_loss_weight = 0.0  # pixel loss on the query-only branch (ablation)
    c.genclip.map_reduce = "mean"  # over layers (keeps maps in [0, 1])
    c.genclip.fusion_w = 0.5  # weight of the vision-enhanced branch at inference
    c.genclip.sigma = 4.0
    c.genclip.image_score = "mix"  # "global", "max", or "mix" of the two
    c.genclip.image_score_mix = 0.5  # weight of the pixel max in "mix"
    c.genclip.cnf = ml_collections.ConfigDict()
    c.genclip.cnf.rule = "B"  # "B" (image-text alignment), "A", "A'" (vocabulary), "off"
    c.genclip.cnf.margin = 0.0
    c.genclip.cnf.template = "a photo of {}."  # "{}": the word with its article, "an object"
    c.genclip.cnf.generic_word = "object"

    # WinCLIP (nothing to train): compositional prompt ensemble and sliding windows (winclip
    # spec). Defaults reproduce anomalib's implementation.
    c.winclip = ml_collections.ConfigDict()
    c.winclip.scales = (2, 3)  # window sides in patches, stride 1
    c.winclip.patch_ln_post = True  # few-shot patch tokens after ln_post (False: raw, zqhang)
    c.winclip.templates = list(winclip_prompts.TEMPLATES)  # 21, one repeated (the reference's)
    c.winclip.normal_states = list(winclip_prompts.NORMAL_STATES)
    c.winclip.anomalous_states = list(winclip_prompts.ANOMALOUS_STATES)
    c.winclip.temperature = 0.07
    c.winclip.generic_word = "object"  # the class word when the class is unknown

    # Few-shot (every method; `genclip_jax.fewshot`): k normal reference images per class from
    # `reference`, a dataset root with meta.json (the good images of `split`), a good/defect
    # folder or a folder of class folders, drawn with `seed`. `eval` defaults to the test
    # root's `split`. AnomalyCLIP/GenCLIP fuse `1 - max cos` to the references' patch tokens
    # at `layers` into their map and score; WinCLIP+ has its own association (winclip spec).
    c.fewshot = ml_collections.ConfigDict()
    c.fewshot.k = 0  # 0: zero-shot
    c.fewshot.reference = ""  # eval: empty = data.test_root; predict / calibrate: required
    c.fewshot.split = "train"
    c.fewshot.seed = 0
    c.fewshot.layers = ()  # empty: the method's patch layers
    c.fewshot.weight = 0.5  # map = (1 - weight) * zero-shot + weight * few-shot
    c.fewshot.image_weight = 0.5  # score = zero-shot score + image_weight * max(few-shot map)
    c.fewshot.chunk_rows = 4096  # bank rows per matmul of the nearest-neighbour search

    # Data: meta.json datasets (AnomalyCLIP/AdaCLIP format).
    c.data = ml_collections.ConfigDict()
    c.data.train_root = ""
    c.data.train_split = "test"  # the official recipe trains on the auxiliary set's test split
    c.data.train_classes = ()  # empty: all classes of meta.json
    c.data.test_root = ""
    c.data.test_split = "test"
    c.data.test_classes = ()
    c.data.prefetch = 2
    # A defect listed without a mask: "ignore" = no pixel labels (pixel losses and pixel metrics
    # leave it out, image ones count it), "zeros" = an all-normal mask (the reference code).
    c.data.missing_mask = "ignore"

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 15
    c.train.batch_size = 8
    c.train.lr = 1e-3
    c.train.b1 = 0.5
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    c.train.seed = 111
    c.train.shuffle = True
    c.train.cache_features = False  # compute the frozen vision taps once, reuse every epoch
    # Paste synthetic defects (with exact masks) on a fraction of each epoch's normal images:
    # training from normal images only. Kinds: data/anomaly_synthesis.py.
    c.train.synthetic_anomalies = False
    c.train.synthetic_fraction = 0.5
    c.train.synthetic_kinds = ["cutpaste", "perlin", "scratch", "spot", "crack"]
    c.train.synthetic_weights = [1.0, 1.0, 1.0, 1.0, 1.0]  # one per kind, relative
    c.train.checkpoint_keep = 3
    c.train.log_every_steps = 10
    c.train.progress = True

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 8
    c.eval.aupro_mode = "reference"  # or "exact"
    c.eval.metrics = [
        "pixel_auroc", "pixel_aupro", "image_auroc", "image_ap", "pixel_ap", "pixel_f1_max",
        "image_f1_max",
    ]
    c.eval.heatmaps_per_class = 4
    # Pixel metrics on maps and masks resized to this size (several papers use 256); 0: the
    # model's image size (exact, the reference's numbers).
    c.eval.metric_size = 0
    c.eval.params = ""  # params-only checkpoint dir (convert output); empty: latest in workdir

    # `genclip-jax calibrate`: thresholds from normal images (and labelled defects, if given).
    c.calibrate = ml_collections.ConfigDict()
    c.calibrate.image_fpr = 0.01  # target false-alarm rate of the image threshold
    c.calibrate.pixel_fpr = 0.001  # target false-positive rate of the pixel threshold
    c.calibrate.policy = "fpr"  # or "f1" (needs --anomalous): which thresholds decide
    c.calibrate.min_images = 10  # normal images a class needs for thresholds of its own
    c.calibrate.allow_fallback = False  # fewer: the global thresholds (else an error)
    c.calibrate.display_quantile = 0.999  # heatmap range top: this quantile of all pixels
    c.calibrate.outlier_quantile = 0.999  # a "normal" image above this quantile of the rest
    c.calibrate.outlier_iqr = 1.5  # ... plus this many interquartile ranges is reported

    c.parallel = ml_collections.ConfigDict()
    c.parallel.num_devices = 0  # 0: every device of every host; n: the first n (one host only)
    c.parallel.multihost = False  # call jax.distributed.initialize()
    c.parallel.coordinator_address = ""
    c.parallel.num_processes = 0
    c.parallel.process_id = -1
    c.parallel.initialization_timeout = 300
    c.parallel.heartbeat_timeout = 100  # a process whose peer died stops after this many seconds
    return c


def tiny_config(method: str = "anomalyclip") -> ml_collections.ConfigDict:
    """Offline demo and CI: random tiny backbone, 112 px synthetic images, 2 epochs.

    `data.train_root` / `data.test_root` are left empty: the demo writes a synthetic dataset
    and points both at it.
    """
    if method == "winclip":
        return tiny_winclip_config()
    c = base_config()
    c.method = method
    c.model.clip = "random"
    c.model.image_size = 112
    c.prompts.n_ctx = 4
    c.prompts.deep_depth = 3
    c.prompts.deep_length = 2
    c.anomalyclip.features_list = [24]
    c.genclip.state_len = 4
    c.genclip.gqp_len = 4
    c.train.epochs = 2
    c.train.batch_size = 8
    c.train.log_every_steps = 1
    c.eval.batch_size = 8
    c.eval.heatmaps_per_class = 2
    return c


def winclip_config(dataset: str = "mvtec") -> ml_collections.ConfigDict:
    """WinCLIP on `data/<dataset>`: open_clip ViT-B-16-plus-240 (exact GELU) at 240, no DPAM."""
    c = base_config()
    c.method = "winclip"
    c.model.clip = "ViT-B-16-plus-240"  # open_clip name: its HF hub repo, through the cache
    c.model.architecture = "ViT-B-16-plus-240"
    c.model.image_size = 240
    c.model.dpam_start = 0
    c.data.test_root = f"data/{dataset}"
    c.fewshot.reference = f"data/{dataset}"
    return c


def tiny_winclip_config() -> ml_collections.ConfigDict:
    """WinCLIP on a tiny random backbone of ViT-B-16-plus-240's structure (patch 16, exact
    GELU, 12 layers) at 112 px (a 7x7 patch grid): the demo and CI."""
    c = winclip_config()
    c.model.clip = "random"
    c.model.architecture = ""
    c.model.activation = "gelu"
    c.model.random_arch = tiny_backbone()
    c.model.random_arch.update(vision_patch_size=16, image_resolution=112, vision_layers=12)
    c.model.image_size = 112
    c.data.test_root = ""
    c.fewshot.reference = ""
    c.eval.batch_size = 8
    c.eval.heatmaps_per_class = 2
    c.train.progress = True
    return c
