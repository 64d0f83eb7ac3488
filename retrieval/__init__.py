"""Support store: embed labelled support images, index them in FAISS, retrieve the nearest ones."""
