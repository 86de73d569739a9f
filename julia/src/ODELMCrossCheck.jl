"""
    ODELMCrossCheck

The ode-lm time-indexed model written again in Julia, solved with OrdinaryDiffEq and
differentiated with SciMLSensitivity, to cross-check ode-lm's JAX/diffrax solves
(`ode-lm crosscheck --backend julia`, docs/interop.md).

    x(0)    = E[tokens] + P[1:seq]
    g(t)    = sigmoid(W2' silu(W1' [sin(w t); cos(w t)] + b1) + b2)   (split qkv|proj|fc1|fc2)
    f(t, x) = attn(LN_a(x); g) + mlp(LN_m(x); g)                     (gated linear: (W' x) .* g .+ b)
    logits  = E LN_r(x(1))   (tied) or head' LN_r(x(1))
    loss    = mean over tokens of logsumexp(logits) - logits[target]

Parameters come from ode-lm's export file (`ode_lm.interop.save_export`): row-major
`.npy` members which NPZ.jl reads by the reversed-dims rule, so every array has the shape
and indexing it has in Python (a weight is `(fan_in, fan_out)`, shifted to 1-based).

The hidden state is feature-major: `X[d, s, b]` is Python's `x[b-1, s-1, d-1]`, i.e. the
reversed-dims view of the row-major Python array, so `vec(X)` is Python's `x.ravel()`.
All parameters live in one flat vector `θ` (plain arrays: every AD backend and every
sensitivity algorithm handles them); `Layout` maps names to ranges and shapes.
"""
module ODELMCrossCheck

using LinearAlgebra
using NPZ: npzread
using OrdinaryDiffEq
using SciMLSensitivity
using Statistics: mean
using Zygote

export Layout, Model, load_model, embed, field, readout, cross_entropy, forward, loss_gradient, crosscheck

const FORMAT_VERSION = 1
const MASKED = -1.0e300  # additive causal mask: exp underflows to exactly 0, no Inf arithmetic in AD

"""Where each named parameter array lives inside the flat parameter vector."""
struct Layout
    names::Vector{String}
    ranges::Dict{String,UnitRange{Int}}
    shapes::Dict{String,Tuple{Vararg{Int}}}
end

"""Hyperparameters of the exported model and the batch shape it runs on."""
struct Model
    layout::Layout
    heads::Int
    mlp_ratio::Int
    time_embed_dim::Int
    eps::Float64
    max_frequency::Float64
    dim::Int
    vocab::Int
    tied::Bool
    seq::Int
    batch::Int
    mask::Matrix{Float64}  # (key, query): 0 where key <= query, MASKED elsewhere
end

"""The array `name` as a view-free copy of its slice of `θ`, in its Python shape."""
param(θ, L::Layout, name::String) = reshape(θ[L.ranges[name]], L.shapes[name])

"""Flatten the named arrays (sorted by name) into one Float64 vector and its `Layout`."""
function flatten_params(arrays::AbstractDict)
    names = sort([String(k) for k in keys(arrays) if !startswith(String(k), "config.")])
    θ = Float64[]
    ranges = Dict{String,UnitRange{Int}}()
    shapes = Dict{String,Tuple{Vararg{Int}}}()
    for name in names
        a = Array{Float64}(arrays[name])
        ranges[name] = (length(θ) + 1):(length(θ) + length(a))
        shapes[name] = size(a)
        append!(θ, vec(a))
    end
    return θ, Layout(names, ranges, shapes)
end

config_value(arrays, key) = haskey(arrays, key) ? arrays[key][1] :
    error("$(key) missing from the export file: write it with ode_lm.interop.save_export")

"""
    load_model(path, seq, batch) -> (θ, model)

Read an ode-lm export file and set up the model for batches of `batch` sequences of `seq`
tokens. Checks the format version and that the shapes fit together.
"""
function load_model(path::AbstractString, seq::Integer, batch::Integer)
    arrays = npzread(path)
    version = Int(config_value(arrays, "config.format_version"))
    version == FORMAT_VERSION || error("$(path): export format $(version); this project reads $(FORMAT_VERSION)")
    θ, L = flatten_params(arrays)
    vocab, dim = L.shapes["embedding.tokens"]
    heads = Int(config_value(arrays, "config.heads"))
    mlp_ratio = Int(config_value(arrays, "config.mlp_ratio"))
    dim % heads == 0 || error("heads = $(heads) does not divide dim = $(dim)")
    L.shapes["block.attn.qkv.weight"] == (dim, 3dim) || error("block.attn.qkv.weight is not (dim, 3dim)")
    L.shapes["block.mlp.fc1.weight"] == (dim, mlp_ratio * dim) || error("block.mlp.fc1.weight is not (dim, mlp_ratio*dim)")
    seq <= L.shapes["embedding.positions"][1] || error("seq = $(seq) exceeds max_positions")
    mask = [j <= i ? 0.0 : MASKED for j in 1:seq, i in 1:seq]
    model = Model(L, heads, mlp_ratio, Int(config_value(arrays, "config.time_embed_dim")),
                  Float64(config_value(arrays, "config.layer_norm_eps")),
                  Float64(config_value(arrays, "config.max_frequency")),
                  dim, vocab, !haskey(L.ranges, "readout.head"), seq, batch, mask)
    return θ, model
end

# ----------------------------------------------------------------------------- the maths

sigmoid(x) = one(x) / (one(x) + exp(-x))
silu(x) = x * sigmoid(x)
gelu_tanh(x) = x / 2 * (one(x) + tanh(sqrt(2 / π) * (x + 0.044715 * x^3)))

"""`(W' X) .* g .+ b` for a Python-shaped weight `W` (fan_in, fan_out) and features-first `X`."""
function linear(θ, m::Model, name::String, X, gate=nothing)
    Y = transpose(param(θ, m.layout, name * ".weight")) * X
    Y = gate === nothing ? Y : Y .* gate
    return Y .+ param(θ, m.layout, name * ".bias")
end

"""Column sums as a product with a row of ones: matrix products are what every AD backend
(ReverseDiff included) differentiates natively, unlike reductions with `dims`."""
colsum(X) = ones(1, size(X, 1)) * X

"""LayerNorm over features (dimension 1), biased variance, as ode-lm's `LayerNorm`."""
function layer_norm(θ, m::Model, name::String, X)
    n = size(X, 1)
    centred = X .- colsum(X) ./ n
    var = colsum(centred .^ 2) ./ n
    return centred ./ sqrt.(var .+ m.eps) .* param(θ, m.layout, name * ".weight") .+
           param(θ, m.layout, name * ".bias")
end

"""`[sin.(w t); cos.(w t)]` with `w_k = max_frequency^(k / (half - 1))`, k = 0..half-1."""
function sinusoidal(m::Model, t)
    half = m.time_embed_dim ÷ 2
    freqs = [m.max_frequency^(k / max(half - 1, 1)) for k in 0:(half - 1)]
    return vcat(sin.(t .* freqs), cos.(t .* freqs))
end

"""All gates at depth-time `t`: qkv (3dim), proj (dim), fc1 (mlp_ratio*dim), fc2 (dim)."""
function gates(θ, m::Model, t)
    hidden = silu.(linear(θ, m, "modulation.hidden", sinusoidal(m, t)))
    return sigmoid.(linear(θ, m, "modulation.out", hidden))
end

"""Column softmax (over keys). No max shift: scores stay far below exp's overflow here,
and the shift's `maximum` is a reduction ReverseDiff would trace element by element."""
function softmax_keys(scores)
    e = exp.(scores)
    return e ./ colsum(e)
end

"""Causal multi-head attention on features-first `Xn` (dim, seq*batch)."""
function attention(θ, m::Model, Xn, g_qkv, g_proj)
    D, S, B, hd = m.dim, m.seq, m.batch, m.dim ÷ m.heads
    QKV = linear(θ, m, "block.attn.qkv", Xn, g_qkv)  # rows: q | k | v, each split into heads
    scale = 1 / sqrt(hd)
    per_batch = map(1:B) do b
        cols = ((b - 1) * S + 1):(b * S)
        per_head = map(1:m.heads) do h
            rows = ((h - 1) * hd + 1):(h * hd)
            Q, K, V = QKV[rows, cols], QKV[D .+ rows, cols], QKV[2D .+ rows, cols]
            V * softmax_keys(transpose(K) * Q .* scale .+ m.mask)  # (hd, seq)
        end
        vcat(per_head...)
    end
    return linear(θ, m, "block.attn.proj", hcat(per_batch...), g_proj)
end

"""`dX/dt = attn_t(LN_a(X)) + mlp_t(LN_m(X))` for `X` of size (dim, seq, batch)."""
function field(θ, m::Model, t, X)
    D, H = m.dim, m.mlp_ratio * m.dim
    g = gates(θ, m, t)
    g_qkv, g_proj = g[1:3D], g[(3D + 1):4D]
    g_fc1, g_fc2 = g[(4D + 1):(4D + H)], g[(4D + H + 1):(5D + H)]
    X2 = reshape(X, D, m.seq * m.batch)
    a = attention(θ, m, layer_norm(θ, m, "block.ln_attn", X2), g_qkv, g_proj)
    hidden = gelu_tanh.(linear(θ, m, "block.mlp.fc1", layer_norm(θ, m, "block.ln_mlp", X2), g_fc1))
    return reshape(a .+ linear(θ, m, "block.mlp.fc2", hidden, g_fc2), D, m.seq, m.batch)
end

"""`x(0)`: token plus position embeddings; `tokens` is (seq, batch), 1-based."""
function embed(θ, m::Model, tokens::AbstractMatrix{<:Integer})
    E = param(θ, m.layout, "embedding.tokens")  # (vocab, dim)
    P = param(θ, m.layout, "embedding.positions")  # (max_positions, dim)
    X = reshape(permutedims(E[vec(tokens), :]), m.dim, m.seq, m.batch)
    return X .+ permutedims(P[1:m.seq, :])
end

"""Logits (vocab, seq*batch) of the final state."""
function readout(θ, m::Model, X)
    Xn = layer_norm(θ, m, "readout.norm", reshape(X, m.dim, m.seq * m.batch))
    return m.tied ? param(θ, m.layout, "embedding.tokens") * Xn :
           transpose(param(θ, m.layout, "readout.head")) * Xn
end

"""Mean next-token cross-entropy; `onehot` (vocab, seq*batch) marks the targets."""
function cross_entropy(logits, onehot)
    z = logits .- maximum(logits; dims=1)
    logp = z .- log.(sum(exp.(z); dims=1))
    return -mean(sum(logp .* onehot; dims=1))
end

# ------------------------------------------------------------------------------ the solves

const SOLVERS = Dict("euler" => Euler, "heun" => Heun, "midpoint" => Midpoint, "rk4" => RK4,
                     "tsit5" => Tsit5, "dopri5" => DP5)

function solver(name::AbstractString)
    haskey(SOLVERS, name) || error("no OrdinaryDiffEq solver for $(name); choose one of $(join(sort(collect(keys(SOLVERS))), ", "))")
    return SOLVERS[name]()
end

"""Keyword arguments of `solve`: the fixed grid t_n = n/steps, or tight adaptive control."""
function solve_options(steps::Integer, tol::Union{Nothing,Float64})
    dt = 1.0 / steps
    tol === nothing && return (dt=dt, adaptive=false)
    return (dt=dt, adaptive=true, abstol=tol, reltol=tol, maxiters=10^6)
end

function sensealg(name::AbstractString, tol::Float64)
    name == "ReverseDiffAdjoint" && return ReverseDiffAdjoint()
    name == "BacksolveAdjoint" && return BacksolveAdjoint(autojacvec=ZygoteVJP())
    name == "InterpolatingAdjoint" && return InterpolatingAdjoint(autojacvec=ZygoteVJP())
    name == "QuadratureAdjoint" && return QuadratureAdjoint(autojacvec=ZygoteVJP(), abstol=tol, reltol=tol)
    error("unknown sensitivity $(name)")
end

"""The out-of-place problem `du/dt = vec(field(p, t, reshape(u)))` over t in [0, 1]."""
function ode_problem(θ, m::Model, tokens)
    rhs(u, p, t) = vec(field(p, m, t, reshape(u, m.dim, m.seq, m.batch)))
    return ODEProblem{false}(rhs, vec(embed(θ, m, tokens)), (0.0, 1.0), θ)
end

"""`x(1)` (dim, seq, batch) of the solve from `x(0) = embed(tokens)`. `u0` and `p` go to
`solve` as keywords, the form SciMLSensitivity differentiates with respect to."""
function final_state(θ, m::Model, tokens, prob, alg, options; sensealg=nothing)
    u0 = vec(embed(θ, m, tokens))
    sol = sensealg === nothing ?
          solve(prob, alg; u0=u0, p=θ, options..., saveat=[1.0]) :
          solve(prob, alg; u0=u0, p=θ, options..., saveat=[1.0], sensealg=sensealg)
    (!isempty(sol.t) && sol.t[end] == 1.0) || error("the $(nameof(typeof(alg))) solve stopped before t = 1: $(sol.retcode)")
    return reshape(Array(sol)[:, end], m.dim, m.seq, m.batch)
end

"""`(x(1), logits, loss)` without gradients."""
function forward(θ, m::Model, tokens, onehot, prob, alg, options)
    X1 = final_state(θ, m, tokens, prob, alg, options)
    logits = readout(θ, m, X1)
    return X1, logits, cross_entropy(logits, onehot)
end

"""The gradient of the loss with respect to `θ` through the sensitivity `sense`."""
function loss_gradient(θ, m::Model, tokens, onehot, prob, alg, options, sense)
    loss(p) = cross_entropy(readout(p, m, final_state(p, m, tokens, prob, alg, options; sensealg=sense)), onehot)
    return Zygote.gradient(loss, θ)[1]
end

"""A Python-shaped array flattened in row-major order (what NumPy's `ravel` gives)."""
c_order(a::AbstractArray) = ndims(a) <= 1 ? collect(vec(a)) : vec(permutedims(a, ndims(a):-1:1))

"""
    crosscheck(path, tokens, targets, steps, fixed, adaptive, tol, grad_solver, discrete, continuous)

What `ode-lm crosscheck --backend julia` asks of Julia. `tokens` and `targets` are Python's
(batch, seq) 0-based integer arrays; `fixed`, `adaptive`, `discrete` and `continuous` are
comma-separated names (plain strings cross the Python bridge as Julia `String`s). Returns a `Dict` of row-major flat arrays and numbers:
`"fixed/<solver>/state|logits|loss"` on the grid `t_n = n/steps`, `"adaptive/<solver>/..."`
at `abstol = reltol = tol`, and `"grad/<sensitivity>/<parameter>"`: the discrete
sensitivities on `grad_solver`'s fixed grid, the continuous ones with adaptive Tsit5 at `tol`.
"""
function crosscheck(path::AbstractString, tokens_in, targets_in, steps::Integer, fixed::AbstractString,
                    adaptive::AbstractString, tol::Real, grad_solver::AbstractString,
                    discrete::AbstractString, continuous::AbstractString)
    split_names(list) = [String(x) for x in split(list, ','; keepempty=false)]
    tokens = permutedims(Int.(collect(tokens_in))) .+ 1  # (seq, batch), 1-based
    targets = permutedims(Int.(collect(targets_in))) .+ 1
    seq, batch = size(tokens)
    θ, m = load_model(path, seq, batch)
    onehot = zeros(m.vocab, seq * batch)
    for (n, target) in enumerate(vec(targets))
        onehot[target, n] = 1.0
    end
    prob = ode_problem(θ, m, tokens)
    out = Dict{String,Any}()
    record!(prefix, X1, logits, loss) = begin
        out[prefix * "/state"] = vec(X1)  # (dim, seq, batch) column-major == row-major (batch, seq, dim)
        out[prefix * "/logits"] = vec(logits)  # (vocab, seq*batch) == row-major (batch, seq, vocab)
        out[prefix * "/loss"] = loss
    end
    for name in split_names(fixed)
        record!("fixed/" * name, forward(θ, m, tokens, onehot, prob, solver(name), solve_options(steps, nothing))...)
    end
    tol = Float64(tol)
    for name in split_names(adaptive)
        record!("adaptive/" * name, forward(θ, m, tokens, onehot, prob, solver(name), solve_options(steps, tol))...)
    end
    for (algs, alg, options) in ((split_names(discrete), solver(grad_solver), solve_options(steps, nothing)),
                                 (split_names(continuous), Tsit5(), solve_options(steps, tol)))
        for name in algs
            g = loss_gradient(θ, m, tokens, onehot, prob, alg, options, sensealg(name, tol))
            for pname in m.layout.names
                out["grad/" * name * "/" * pname] = c_order(param(g, m.layout, pname))
            end
        end
    end
    return out
end

end # module
