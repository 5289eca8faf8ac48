"""Readers and writers for the data the pipeline consumes (shards, ImageFolder, generated shapes)."""
