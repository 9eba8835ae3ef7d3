"""Videos and images as the model sees them: which frames to take, at what size, and decoding
them (PyAV). One implementation for the server (`server.media`) and for training, so a video
trains on the very frames it is served with. Blocking code; callers pick the thread."""
