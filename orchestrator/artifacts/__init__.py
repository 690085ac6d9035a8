"""What a trained adapter becomes: scored (eval), merged into its base, exported to GGUF for llama.cpp."""
