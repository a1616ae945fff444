"""Shared test set-up: CPU only, 8 fake devices, offline hubs, fixture paths."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import pathlib

DATA_DIR = pathlib.Path(__file__).parent / "data"


# The slowest modules first (by their seconds on 2 cores with a cold XLA cache, 2026-12-03):
# pytest-xdist hands whole modules to its two workers in this order, so neither is left alone
# with a long one at the end.
SLOW_FIRST = (
    "test_readme", "test_readme_own_data", "test_fewshot", "test_multihost_recovery",
    "test_multihost", "test_winclip", "test_readme_winclip", "test_api", "test_export",
    "test_ablate", "test_compile_once", "test_genclip", "test_anomalyclip_parity", "test_cli",
    "test_protocol", "test_faults", "test_bfloat16", "test_missing_masks", "test_train_e2e",
    "test_evaluate", "test_anomaly_synthesis", "test_maps_losses", "test_folder_layout",
    "test_forward_fast_paths", "test_convert", "test_cnf", "test_clip_parity",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable in a module
