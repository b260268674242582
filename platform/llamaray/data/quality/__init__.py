"""CommonCrawl's model-based quality steps (CCNet, Wenzek et al. 2020; LLaMA section 2.1),
one module each, and the training of their models.

- `normalize`: CCNet's text normalization, shared by training and scoring.
- `language_id`: fastText language id (keep the wanted language at >= 0.5).
- `perplexity`: KenLM perplexity on SentencePiece pieces, head / middle / tail buckets.
- `reference`: the fastText classifier of Wikipedia references vs random pages.
- `steps`: which steps run (`CorpusConfig.quality`), the check of their files, their order,
  their manifest entry.
- `models`: opening the model files (local or s3://) once per process.
- `trainers`: training each model in one process (fastText, KenLM's lmplz, the cutoffs).
- `train`: `llamaray quality train` on Ray: text preparation as a Ray Data pipeline, the
  training as one Ray task.
"""
