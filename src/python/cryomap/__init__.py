"""cryomap: cryo-EM reconstruction by Bayesian MAP expectation-maximisation.

Modules: `fourier` (grid conventions), `euler` (RELION Euler angles), `ctf`, `sampling`,
`projector` (Fourier-slice projection), `io` (MRC, STAR), `particles`, `phantom`, `simulate`,
`em` (E/M steps and drivers), `cli`.
"""

__version__ = "0.1.0"
