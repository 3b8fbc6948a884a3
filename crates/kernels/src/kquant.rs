//! ggml K-quant formats (Q4_K, Q5_K, Q6_K): block layouts, dequantisation, Q8_K activation
//! quantisation and dot products with ggml's numerics.
