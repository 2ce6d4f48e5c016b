//! Settings spelled as names (`resnet18-cifar`, `idkm-jfb`, `cuda:1`): one
//! spelling on the command line, in checkpoints' metadata and in profile
//! records, through `FromStr` and `Display`.

/// Implements serde's `Serialize` and `Deserialize` for `$ty` through its
/// `Display` and `FromStr`, so that files spell it as the command line does.
macro_rules! serde_by_name {
    ($($ty:ty),+ $(,)?) => {$(
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                name.parse().map_err(serde::de::Error::custom)
            }
        }
    )+};
}

pub(crate) use serde_by_name;
