"""From files to tokens: PDF documents into articles and QA pairs, NER corpora, splits, tokenization and packing,
the Ray Data pipelines that stream into the training workers, and the embedded base model built from the corpus."""
