"""Numeric kernels of the attribution methods: Diffusion-TracIn / ReTrac (``tracin``) and TRAK / D-TRAK /
Journey-TRAK (``trak``). The method families of ``diffattr.methods`` wire them into stages."""
