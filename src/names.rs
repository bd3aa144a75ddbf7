//! One spelling for every named choice (models, datasets, kernel versions, precisions): the
//! command-line name clap's `ValueEnum` derives, used in flags, tables, `config.json` and
//! checkpoint metadata alike, so no string is matched by hand anywhere.

use clap::ValueEnum;

/// Where a computation runs (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    Cpu,
    Cuda,
}

/// The command-line name of a value.
pub trait Named {
    fn name(&self) -> String;
}

impl<E: ValueEnum> Named for E {
    fn name(&self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// The value whose command-line name is `name`, or an error listing the possible names.
pub fn parse<E: ValueEnum>(what: &str, name: &str) -> crate::Result<E> {
    E::from_str(name, false).map_err(|_| {
        let names: Vec<String> = E::value_variants().iter().map(Named::name).collect();
        crate::Error::invalid(format!(
            "{what} {name:?} is not one of {}",
            names.join(", ")
        ))
    })
}

/// Implements `serde::Serialize` and `Deserialize` for `ValueEnum` types by their command-line
/// names, so config files spell every choice as the flags do.
#[macro_export]
macro_rules! serde_by_name {
    ($($t:ty),+ $(,)?) => {$(
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&$crate::names::Named::name(self))
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let name = <String as serde::Deserialize>::deserialize(d)?;
                $crate::names::parse::<$t>("the name", &name).map_err(serde::de::Error::custom)
            }
        }
    )+};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
    enum Example {
        FusedV2,
        Resnet18Cifar,
    }
    crate::serde_by_name!(Example);

    #[test]
    fn names_round_trip_and_unknown_names_list_the_choices() {
        assert_eq!(Example::FusedV2.name(), "fused-v2");
        assert_eq!(Example::Resnet18Cifar.name(), "resnet18-cifar");
        assert_eq!(
            parse::<Example>("model", "resnet18-cifar").unwrap(),
            Example::Resnet18Cifar
        );
        let err = parse::<Example>("model", "resnet50")
            .unwrap_err()
            .to_string();
        assert!(err.contains("fused-v2, resnet18-cifar"), "{err}");
        assert_eq!(
            serde_json::to_string(&Example::FusedV2).unwrap(),
            "\"fused-v2\""
        );
        let back: Example = serde_json::from_str("\"resnet18-cifar\"").unwrap();
        assert_eq!(back, Example::Resnet18Cifar);
    }
}
