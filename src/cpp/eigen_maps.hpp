// Eigen views of the kernels' plain row-major float32 buffers (shared by the E- and M-step).
#pragma once

#include <Eigen/Core>

namespace cryomap {

using RowMat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstMap = Eigen::Map<const RowMat>;
using MutMap = Eigen::Map<RowMat>;
using StridedMap = Eigen::Map<RowMat, 0, Eigen::OuterStride<>>;

}  // namespace cryomap
