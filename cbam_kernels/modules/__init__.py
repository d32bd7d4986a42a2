"""The fused attention modules: CBAM, its channel and spatial gates, and SE (thin nn.Modules over ``ops``)."""
