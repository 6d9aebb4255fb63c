"""Target presets, one data file each (host CPU, Android arm64, Adreno/Mali OpenCL, Vulkan)."""
