"""Models on disk: load any layout, save this project's, convert, quantize and fuse."""
