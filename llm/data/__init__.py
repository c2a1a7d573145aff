"""Datasets: text reading (`text`), corpus → Parquet (`corpus`), training windows (`windows`), data sources
(`sources`), and the fine-tuning datasets (`classification`, `instructions`)."""
