"""Datasets: text reading (`text`), corpus → Parquet (`corpus`), training windows (`windows`), data sources
(`sources`), and the fine-tuning datasets (`classification`, `instructions`)."""

SPLITS = ("train", "val", "test")  # the names of a fine-tuning dataset's three splits
