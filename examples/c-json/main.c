/* Parses and prints JSON with json-c, a library image i1 does not have: its .debs come with the
 * job (construir-pack --vendor reads debian/control) and are installed before the build. */
#include <json-c/json.h>
#include <stdio.h>

int main(void) {
    json_object *o = json_tokener_parse("{\"a\": [1, 2, 3]}");
    if (o == NULL)
        return 1;
    printf("%s\n", json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN));
    json_object_put(o);
    return 0;
}
