"""Task metrics on generated answers (BLEU / ROUGE-L, exact match)."""
