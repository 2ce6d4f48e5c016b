//! The reference implementation: soft k-means in composed candle ops, which
//! materialise the m x k attention and let candle's autograd differentiate.
//!
//! DKM is this, unrolled for t iterations. It is the ground truth of the
//! tests and the baseline of every benchmark; it is slow and its memory grows
//! with t, which is the point.

use super::config::Distance;
use super::streaming::Geometry;
use crate::error::{Error, Result};
use candle_core::{DType, Tensor, Var, D};

/// Attention `a_ij = softmax_j(-dist(w_i, c_j) / tau)`, m x k, from `w` (m x d)
/// and `c` (k x d). Uses the autograd-aware softmax of candle-nn.
pub fn attention(w: &Tensor, c: &Tensor, geo: &Geometry) -> Result<Tensor> {
    let diff = w.unsqueeze(1)?.broadcast_sub(&c.unsqueeze(0)?)?;
    let sq = diff.sqr()?.sum(D::Minus1)?;
    let dist = match geo.distance {
        Distance::Squared => sq,
        // The tiny offset keeps the derivative of the root finite at zero distance.
        Distance::Euclidean => (sq + 1e-30)?.sqrt()?,
    };
    Ok(candle_nn::ops::softmax(
        &(dist * (-1.0 / geo.tau))?,
        D::Minus1,
    )?)
}

/// One k-means step `F(C, W)_j = sum_i a_ij w_i / sum_i a_ij` (k x d).
pub fn kmeans_step(w: &Tensor, c: &Tensor, geo: &Geometry) -> Result<Tensor> {
    let a = attention(w, c, geo)?;
    let mass = a.sum(0)?.unsqueeze(1)?;
    Ok(a.t()?.matmul(w)?.broadcast_div(&mass)?)
}

/// The soft-clustered weights `A(C, W) C` (m x d).
pub fn soft_output(w: &Tensor, c: &Tensor, geo: &Geometry) -> Result<Tensor> {
    Ok(attention(w, c, geo)?.matmul(c)?)
}

/// DKM: `steps` k-means steps from `c0`, recorded by autograd, then the
/// output. Stops early (still recorded) once no centroid moves more than
/// `tol`. Returns the soft-clustered weights and the last centroids.
pub fn dkm(
    w: &Tensor,
    c0: &Tensor,
    geo: &Geometry,
    steps: usize,
    tol: f64,
) -> Result<(Tensor, Tensor, usize)> {
    let mut c = c0.clone();
    let mut done = 0;
    while done < steps {
        let next = kmeans_step(w, &c, geo)?;
        let shift = (&next - &c)?.detach().sqr()?.sum(1)?.sqrt()?.max(0)?;
        let shift = shift.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        c = next;
        done += 1;
        if shift <= tol {
            break;
        }
    }
    Ok((soft_output(w, &c, geo)?, c, done))
}

/// How the reference gradient treats the adjoint system.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adjoint {
    /// Solve `(I - J)^T u = h` exactly (dense, f64): IDKM.
    Exact,
    /// `u = h`: IDKM-JFB.
    JacobianFree,
}

/// `d/dX sum(v * f(X))` for one input, through candle's autograd.
fn vjp(x: &Var, y: &Tensor, v: &Tensor) -> Result<Tensor> {
    let grads = (y * v)?.sum_all()?.backward()?;
    grads
        .get(x.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Numerical("reference: no gradient reached the input".into()))
}

/// The implicit gradient `dL/dW = G_W^T g + F_W^T u` at a fixed point `c_star`
/// of the k-means map, for the upstream gradient `g` (m x d), built from
/// autograd vector-Jacobian products and a dense solve of the adjoint system.
pub fn implicit_grad(
    w: &Tensor,
    c_star: &Tensor,
    g: &Tensor,
    geo: &Geometry,
    adjoint: Adjoint,
) -> Result<Tensor> {
    let (k, d) = c_star.dims2()?;
    let n = k * d;
    let wv = Var::from_tensor(&w.detach())?;
    let cv = Var::from_tensor(&c_star.detach())?;
    // Direct term and the centroid cotangent h from one backward pass.
    let out = soft_output(wv.as_tensor(), cv.as_tensor(), geo)?;
    let grads = (&out * g)?.sum_all()?.backward()?;
    let direct = grads
        .get(wv.as_tensor())
        .cloned()
        .unwrap_or(wv.zeros_like()?);
    let h =
        flat_f64(grads.get(cv.as_tensor()).ok_or_else(|| {
            Error::Numerical("reference: no gradient reached the centroids".into())
        })?)?;
    let u = match adjoint {
        Adjoint::JacobianFree => h,
        Adjoint::Exact => {
            // Row r of J = d F_r / dC, the VJP of F with the unit vector e_r.
            let f = kmeans_step(wv.as_tensor(), cv.as_tensor(), geo)?;
            let mut system = vec![vec![0f64; n]; n]; // I - J^T
            for r in 0..n {
                let mut e = vec![0f64; n];
                e[r] = 1.0;
                let e = Tensor::from_vec(e, (k, d), w.device())?.to_dtype(w.dtype())?;
                let row = flat_f64(&vjp(&cv, &f, &e)?)?;
                for (col, jrc) in row.iter().enumerate() {
                    system[col][r] = f64::from(u8::from(col == r)) - jrc;
                }
            }
            dense_solve(system, h)?
        }
    };
    let f = kmeans_step(wv.as_tensor(), cv.as_tensor(), geo)?;
    let u = Tensor::from_vec(u, (k, d), w.device())?.to_dtype(w.dtype())?;
    let implicit = vjp(&wv, &f, &u)?;
    Ok((direct + implicit)?)
}

fn flat_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Gaussian elimination with partial pivoting.
fn dense_solve(a: Vec<Vec<f64>>, b: Vec<f64>) -> Result<Vec<f64>> {
    let n = b.len();
    let lu = super::linalg::Lu::new(&a.concat(), n)
        .ok_or_else(|| Error::Numerical("reference: singular adjoint system".into()))?;
    Ok(lu.solve(&b))
}
