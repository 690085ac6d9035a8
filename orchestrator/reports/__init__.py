"""What a run tells its user: run reports with plots, model cards, the pipeline summary, and the scores (QA exact
match / token F1 / ROUGE-L, NER entity P/R/F1) they show."""
