"""CLIP-score filter: cosine similarity of image and caption embeddings, DataComp top-fraction or absolute threshold."""
