"""A deterministic synthetic remote-sensing text-image retrieval benchmark (torch-free: numpy + Pillow).

- :mod:`~galr.synthetic.scenes`: scene descriptions (:class:`SceneSpec`), sampling and rendering.
- :mod:`~galr.synthetic.captions`: five paraphrased captions per scene, and the vocabulary.
- :mod:`~galr.synthetic.detector`: exact and noisy detections in the project's JSON schema.
- :mod:`~galr.synthetic.benchmark`: the whole dataset on disk in the original RSITMD/RSICD layout.

Typical use::

    from galr.synthetic import BenchmarkConfig, generate_benchmark
    info = generate_benchmark("runs/synthetic", BenchmarkConfig(seed=0))
    # then galr.data.load_split(info.root, "test")
"""

from galr.synthetic.benchmark import (
    BenchmarkConfig,
    BenchmarkError,
    BenchmarkInfo,
    generate_benchmark,
    read_benchmark_info,
    sample_split,
)
from galr.synthetic.captions import (
    build_vocabulary,
    caption_mentions,
    generate_captions,
)
from galr.synthetic.detector import (
    Detection,
    DetectorNoise,
    apply_detector_noise,
    ground_truth_detections,
    read_detections,
    write_detections,
)
from galr.synthetic.scenes import (
    LAND_COVERS,
    OBJECT_CLASSES,
    ObjectGroup,
    ObjectInstance,
    SceneConfig,
    SceneSpec,
    render_scene,
    sample_scene,
)

__all__ = [
    "BenchmarkConfig",
    "BenchmarkError",
    "BenchmarkInfo",
    "generate_benchmark",
    "read_benchmark_info",
    "sample_split",
    "build_vocabulary",
    "caption_mentions",
    "generate_captions",
    "Detection",
    "DetectorNoise",
    "apply_detector_noise",
    "ground_truth_detections",
    "read_detections",
    "write_detections",
    "LAND_COVERS",
    "OBJECT_CLASSES",
    "ObjectGroup",
    "ObjectInstance",
    "SceneConfig",
    "SceneSpec",
    "render_scene",
    "sample_scene",
]
